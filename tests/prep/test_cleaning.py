import pytest

from llmscale.prep.cleaning import CleanedText, CleaningConfig, clean_text

NFC = CleaningConfig()
NFKC = CleaningConfig(unicode_form="NFKC")
SCRUB = CleaningConfig(scrub_pii=True)


def test_unicode_form_composes_and_only_nfkc_folds_compatibility_characters() -> None:
    decomposed = "cafe\u0301"
    assert clean_text(decomposed, NFC).text == "caf\u00e9"
    full_width = "ＡＢＣ，你好"
    assert clean_text(full_width, NFC).text == full_width
    assert clean_text(full_width, NFKC).text == "ABC,你好"
    assert clean_text(decomposed, CleaningConfig(unicode_form="none")).text == decomposed


def test_control_characters_and_invisible_marks_are_removed() -> None:
    text = "\ufeffbell\x07 soft\u00adhyphen zero\u200bwidth lone\ud800surrogate\x00"
    assert clean_text(text, NFC).text == "bell softhyphen zerowidth lonesurrogate"


# As fortunes-zh and coloured terminal captures carry them: SGR colours (ESC[33m, ESC[34;1m ...
# ESC[m), a cursor mode, an OSC window title (ended by BEL) and hyperlink (ended by ST), and
# `tput sgr0`'s character-set selection ESC ( B.
COLOURED = (
    "\x1b]0;fortune\x07\x1b[33m静夜思\x1b[m\n"
    "\x1b[34;1m床前明月光\x1b[m，疑是地上霜。\x1b[?25l\n"
    "see \x1b]8;;https://example.org\x1b\\the poem\x1b]8;;\x1b\\ \x1b[1;31mnow\x1b(B\x1b[m"
)


def test_terminal_escape_sequences_are_removed_whole_and_counted() -> None:
    cleaned = clean_text(COLOURED, NFC)
    assert cleaned.text == "静夜思\n床前明月光，疑是地上霜。\nsee the poem now"
    assert cleaned.terminal_escapes_removed == 11


def test_8_bit_csi_and_osc_are_removed_whole() -> None:
    cleaned = clean_text("\x9b31mred\x9b0m \x9d0;title\x9cplain", NFC)
    assert (cleaned.text, cleaned.terminal_escapes_removed) == ("red plain", 3)


def test_whitespace_is_tidied_but_tabs_and_ideographic_spaces_inside_lines_stay() -> None:
    text = "  line one  \r\nline\ttwo\u00a0and\u2003more\r\n\n\n\n\u3000\u3000中文段落\u3000\n\n"
    assert clean_text(text, NFC).text == "line one\nline\ttwo and more\n\n\u3000\u3000中文段落"


@pytest.mark.parametrize(
    "text",
    ["Ｈｅｌｌｏ\r\n\r\n\r\nworld \t\n", "a\u0301\x0b b", "  \u3000x\u00a0y  \n\n\nz", COLOURED],
)
@pytest.mark.parametrize("config", [NFC, NFKC, SCRUB])
def test_cleaning_twice_changes_nothing(text: str, config: CleaningConfig) -> None:
    once = clean_text(text, config).text
    assert clean_text(once, config).text == once


def test_pii_is_kept_unless_scrubbing_is_asked_for() -> None:
    text = "Write to jane.doe@example.co.uk or call +1 (555) 123-4567."
    assert clean_text(text, NFC) == CleanedText(text)
    scrubbed = clean_text(text, SCRUB)
    assert scrubbed.text == "Write to <email> or call <phone>."
    assert (scrubbed.emails_scrubbed, scrubbed.phones_scrubbed) == (1, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call 555-123-4567 now", "call <phone> now"),
        ("电话13800138000或者+86 138 0013 8000", "电话<phone>或者<phone>"),
        ("mail a_b+tag@mail.example.org.", "mail <email>."),
    ],
)
def test_phone_numbers_and_emails_in_english_and_chinese_text(text: str, expected: str) -> None:
    assert clean_text(text, SCRUB).text == expected


@pytest.mark.parametrize("text", ["In 1599, on 2024-01-15", "Act 3, Scene 2, line 1234", "x@y"])
def test_dates_years_and_short_numbers_are_not_phone_numbers(text: str) -> None:
    cleaned = clean_text(text, SCRUB)
    assert cleaned.text == text
    assert cleaned.phones_scrubbed == cleaned.emails_scrubbed == 0


def test_unknown_unicode_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unicode_form must be one of NFC, NFKC, none"):
        CleaningConfig(unicode_form="NFD")
