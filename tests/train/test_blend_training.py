"""Training on a blend of prepared datasets: a run stopped on 2 ranks and resumed on 1 sees the
global sample order of an uninterrupted run."""

import subprocess
import sys

import pytest
from launching import REPO_ROOT, launch, metric_lines, metrics

pytestmark = pytest.mark.slow

PLAYS = REPO_ROOT / "data" / "shakespeare"


def test_blend_resumed_on_fewer_ranks_continues_the_same_samples(tmp_path):
    prepared = tmp_path / "prepared"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--output", str(prepared),
         "--vocab-size", "1000", "--text-document", "paragraph", "--input",
         f"tragedies={PLAYS / 'hamlet.txt'}", f"tragedies={PLAYS / 'macbeth.txt'}",
         f"comedies={PLAYS / 'tempest.txt'}"],
        check=True, cwd=REPO_ROOT, capture_output=True,
    )
    blend = [
        "data=blend_example",
        f"data.blend=[{{path: {prepared}/tokens/tragedies, weight: 0.7}}, "
        f"{{path: {prepared}/tokens/comedies, weight: 0.3}}]",
        f"data.index_cache_dir={tmp_path / 'index'}", "tokenizer=sentencepiece",
        f"tokenizer.path={prepared / 'tokenizer.model'}", "train.max_steps=8",
        "checkpoint.interval=0", "parallel.zero_stage=1",
    ]
    reference, run_dir = tmp_path / "reference", tmp_path / "resumed"
    launch("torchrun", reference, *blend)
    launch("torchrun", run_dir, *blend, "train.exit_at_step=4")
    lines_before = metric_lines(run_dir)
    launch("python", run_dir, *blend)

    expected, resumed = metrics(reference, "loss"), metrics(run_dir, "loss", lines_before)
    assert sorted(resumed) == list(range(5, 9))
    for step, loss in resumed.items():
        assert abs(loss - expected[step]) / expected[step] < 1e-6, (step, loss, expected[step])
    assert expected[8] < expected[1]
