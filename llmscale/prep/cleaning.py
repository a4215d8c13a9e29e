"""Text normalisation before filtering and deduplication: no terminal escape sequences, one
Unicode form, no control characters, tidy whitespace, and (optionally) e-mail addresses and phone numbers scrubbed."""

import re
import unicodedata
from dataclasses import dataclass

UNICODE_FORMS = ("NFC", "NFKC", "none")

# Terminal escape sequences, as scraped logs, fortunes and terminal captures carry them. Removed
# whole before the control characters: removing only their ESC would leave "[33m" in the text.
_TERMINAL_ESCAPE = re.compile(
    # CSI (colours, cursor moves): ESC [ or its 8-bit form, parameters, intermediates, final.
    "(?:\x1b\\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    # OSC (window titles, hyperlinks): ESC ] or its 8-bit form, ended by BEL or ST.
    "|(?:\x1b\\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\\\|\x9c)"
    # The other escapes, such as the character-set selection ESC ( B that `tput sgr0` emits.
    "|\x1b[\x20-\x2f]*[\x30-\x7e]"
)
# C0/C1 controls other than tab and newline; invisible characters that only break words apart
# for tokenizers and dedup (soft hyphen, zero-width space, byte-order mark); and lone
# surrogates, which JSON escapes can produce but UTF-8 cannot encode.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\ufeff\ud800-\udfff]")
# Space separators that render as an ordinary space. The ideographic space U+3000 is left
# alone: Chinese text indents paragraphs with it.
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING_SPACE = re.compile("[ \t\u3000]+\n")
_BLANK_LINE_RUNS = re.compile("\n{3,}")

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# International or national numbers with optional separators: "+1 (555) 123-4567",
# "555-123-4567", "+86 138 0013 8000", "13800138000". Digit lookarounds rather than \b, so a
# number written straight after Chinese characters (which count as word characters) matches.
_PHONE = re.compile(
    r"(?<![\d+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]?\d{3,4}[ .-]?\d{4}(?!\d)"
)
EMAIL_PLACEHOLDER = "<email>"
PHONE_PLACEHOLDER = "<phone>"


@dataclass(frozen=True)
class CleaningConfig:
    # "NFC" keeps full-width CJK punctuation as written; "NFKC" also folds compatibility
    # characters (full-width letters, ligatures, the full-width comma to ","); "none" skips it.
    unicode_form: str = "NFC"
    # Replace e-mail addresses and phone numbers with <email> and <phone>.
    scrub_pii: bool = False

    def __post_init__(self) -> None:
        if self.unicode_form not in UNICODE_FORMS:
            raise ValueError(
                f"unicode_form must be one of {', '.join(UNICODE_FORMS)}, "
                f"got {self.unicode_form!r}."
            )


@dataclass(frozen=True)
class CleanedText:
    text: str
    terminal_escapes_removed: int = 0
    emails_scrubbed: int = 0
    phones_scrubbed: int = 0


def clean_text(text: str, config: CleaningConfig) -> CleanedText:
    """The normalised text; cleaning it again changes nothing."""
    text, escapes = _TERMINAL_ESCAPE.subn("", text)
    if config.unicode_form != "none":
        text = unicodedata.normalize(config.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _BLANK_LINE_RUNS.sub("\n\n", text).strip()
    if not config.scrub_pii:
        return CleanedText(text, escapes)
    text, emails = _EMAIL.subn(EMAIL_PLACEHOLDER, text)
    text, phones = _PHONE.subn(PHONE_PLACEHOLDER, text)
    return CleanedText(text, escapes, emails, phones)
