"""A bad command line fails fast: exit code 2, one `llmscale: error:` message naming the setting,
no traceback, and nothing trained or written."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
from corpus_fixtures import train_hf_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
Run = Tuple[Path, subprocess.CompletedProcess]  # the run folder it was given, and the outcome

# id: (overrides built from the case's temporary folder, substrings the error must contain)
CASES: Dict[str, Tuple[Callable[[Path], List[str]], List[str]]] = {
    "unknown-experiment": (
        lambda tmp: ["+exp=nosuch"], ["Could not find 'exp/nosuch'", "tiny"],
    ),
    "non-integer": (
        lambda tmp: ["train.max_steps=abc"],
        ["train.max_steps", "'abc'", "could not be converted to Integer"],
    ),
    "unknown-key": (
        lambda tmp: ["train.nosuch=1"], ["train.nosuch", "not in 'TrainConfig'"],
    ),
    "plus-typo": (
        lambda tmp: ["+train.max_step=5"],
        ["unknown key train.max_step", "did you mean train.max_steps?"],
    ),
    "dashed-flag": (
        lambda tmp: ["--max_steps", "5"], ["unknown option '--max_steps'"],
    ),
    "missing-corpus": (
        lambda tmp: [f"data.paths=[{tmp / 'missing' / 'corpus.txt'}]"],
        ["data.paths entry", str(Path("missing") / "corpus.txt"), "matches no file"],
    ),
    "resume-missing": (
        lambda tmp: [f"train.resume={tmp / 'nowhere'}"],
        ["train.resume=", "nowhere: no such folder", "train.resume=auto / none"],
    ),
    "resume-not-a-checkpoint": (
        lambda tmp: [f"train.resume={tmp / 'not_a_checkpoint'}"],
        ["train.resume=", "not_a_checkpoint is not an llmscale checkpoint", "llmscale_state.json"],
    ),
    "mlm-without-mask-token": (
        lambda tmp: ["objective=mlm", "model.causal=false", "tokenizer.kind=huggingface",
                     "tokenizer.path=" + str(train_hf_tokenizer(
                         tmp / "tokenizer.json", REPO_ROOT / "data/shakespeare/tempest.txt"))],
        ["objective=mlm with tokenizer.kind=huggingface", "has no mask token",
         "defines none of ['<mask>', '[MASK]']"],
    ),
    "tp-does-not-divide-heads": (
        lambda tmp: ["parallel.tp=8"],
        ["parallel.tp=8 does not divide model.num_heads=4", "[1, 2, 4]"],
    ),
}


def run_pretrain(args: List[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                          "LLMSCALE_TRACEBACK")}
    return subprocess.run(
        [sys.executable, "launch/pretrain.py", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Run]:
    """Every case's launch, run side by side: each spends seconds importing torch."""
    folders = {case: tmp_path_factory.mktemp(case) for case in CASES}

    def launch(case: str) -> Run:
        tmp = folders[case]
        (tmp / "not_a_checkpoint").mkdir()
        run_dir = tmp / "run"
        overrides = CASES[case][0](tmp)
        return run_dir, run_pretrain(["+exp=tiny", f"train.run_dir={run_dir}",
                                      "logging.tensorboard=false", *overrides])

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(CASES, pool.map(launch, CASES)))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_message(runs: Dict[str, Run], case: str) -> None:
    run_dir, result = runs[case]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "llmscale: error:" in result.stderr
    for part in CASES[case][1]:
        assert part in result.stderr, output
    assert "Traceback" not in output
    # It failed before the process group, the model or the run folder existed.
    assert not run_dir.exists()
    assert "llmscale: world" not in output
