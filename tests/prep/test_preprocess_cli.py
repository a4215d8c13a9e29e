import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from corpus_fixtures import CHINESE, REPO_ROOT, english_paragraphs

CLI = runpy.run_path(str(REPO_ROOT / "tools" / "preprocess_data.py"))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        CLI["main"](args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    records = [{"content": text} for text in english_paragraphs(count=20) + CHINESE]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_named_datasets_flags_and_summary(corpus: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    code, out, err = run_cli(
        [
            "--input",
            f"docs={corpus}",
            "--output",
            str(output),
            "--tokenizer",
            "byte",
            "--json-field",
            "content",
            "--min-chars",
            "60",
            "--languages",
            "zh",
            "--near-dup-threshold",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((output / "report.json").read_text())
    stats = report["datasets"]["docs"]
    assert stats["documents_in"] == 25
    # --languages zh keeps the five Chinese documents and drops the English ones.
    assert stats["documents_kept"] == 5
    assert stats["dropped"] == {"language": 20}
    assert "docs: 25 documents" in out and "dropped language" in out and "tokens/s" in out
    assert (output / "tokens" / "docs" / "part-00000.idx").is_file()


def test_a_long_text_file_is_cut_and_what_cannot_be_is_named(tmp_path: Path, capsys) -> None:
    book = tmp_path / "books" / "book.txt"
    book.parent.mkdir()
    book.write_text("\n\n".join(english_paragraphs(count=20)) + "\n")
    one_line = tmp_path / "books" / "one_line.txt"
    one_line.write_text(" ".join(english_paragraphs(count=20)).replace("\n", " ") + "\n")
    output = tmp_path / "out"
    args = ["--input", str(book.parent), "--output", str(output), "--tokenizer", "byte"]
    code, out, err = run_cli([*args, "--max-chars", "2000"], capsys)
    assert code == 0, err
    stats = json.loads((output / "report.json").read_text())["datasets"]["corpus"]
    assert stats["documents_kept"] > 1 and stats["dropped"] == {"too_long": 1}
    assert f"warning: {one_line}: line 1 (" in out and str(book) not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--input", "no/such/file.jsonl", "--tokenizer", "byte"],
            "--input entry 'no/such/file.jsonl' matches no file",
        ),
        (["--input", "{corpus}"], "give --tokenizer (an existing tokenizer) or --vocab-size"),
        (["--input", "{corpus}", "--tokenizer", "byte", "--vocab-size", "500"], "exactly one"),
        (["--input", "{corpus}", "--tokenizer", "missing.model"], "missing.model does not exist"),
        (["--input", "bad name={corpus}", "--tokenizer", "byte"], "dataset name 'bad name'"),
        (
            ["--input", "{corpus}", "--tokenizer", "byte", "--shard-size-mb", "0"],
            "--shard-size-mb must be > 0",
        ),
        (
            ["--input", "{corpus}", "--tokenizer", "byte", "--languages", "fr"],
            "invalid choice: 'fr'",
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_no_traceback(
    args: list[str], message: str, corpus: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out"
    code, out, err = run_cli(
        [a.replace("{corpus}", str(corpus)) for a in args] + ["--output", str(output)], capsys
    )
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    # Nothing was started: bad input is found before any work.
    assert not (output / "state.sqlite").exists()


def test_script_runs_from_the_repo_root(tmp_path: Path) -> None:
    output = tmp_path / "shakespeare"
    result = subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            "data/shakespeare/tempest.txt",
            "--output",
            str(output),
            "--vocab-size",
            "400",
            "--text-document",
            "paragraph",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "corpus: " in result.stdout and str(output / "report.json") in result.stdout
    assert (output / "tokenizer.model").is_file()
