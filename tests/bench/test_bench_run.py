"""tools/bench.py end to end: real runs through torchrun, a table row per run, the files it writes,
and ratios to the bare loop that follow from the measured tokens/s."""

import csv
import json
import subprocess
import sys

import pytest
from launching import QUIET, REPO_ROOT, clean_env, launch, metrics

pytestmark = pytest.mark.slow


def test_bench_measures_each_plan_against_the_bare_loop(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "tools" / "bench.py"), "+exp=tiny",
               "--plans", "zero0", "dp2-zero1", "--micro-batch-sizes", "4",
               "--steps", "3", "--warmup", "1", "--output", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    table = result.stdout[result.stdout.index("plan "):].splitlines()
    assert [line.split()[:3] for line in table[1:4]] == [
        ["bare", "PyTorch", "1"], ["zero0", "1", "4"], ["dp2-zero1", "2", "4"]]
    # The runs' folders were temporary.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bench.csv", "bench.json", "bench.png"]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "bench.csv").open() as file:
        assert [(r["plan"], r["micro_batch_size"]) for r in csv.DictReader(file)] == [
            ("bare PyTorch", "4"), ("zero0", "4"), ("dp2-zero1", "4")]

    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    bare = rows[0]
    assert bare["vs_bare"] == 1.0
    for row in rows:
        assert row["error"] is None
        assert row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0
        assert row["mfu"] is None  # no known peak for a CPU
        assert len(row["rss_gib_per_rank"]) == row["world_size"]
        assert 0.05 < row["peak_rss_gib"] < 8
        assert row["bare_tokens_per_s"] == bare["tokens_per_s"]
        # A device is a rank, also on CPU (where the ranks share the cores).
        per_device = row["tokens_per_s"] / row["world_size"]
        assert row["tokens_per_s_per_device"] == pytest.approx(per_device)
        assert row["vs_bare"] == pytest.approx(per_device / bare["tokens_per_s"])
        assert "checkpoint.interval=0" in row["overrides"]


def test_the_bare_loop_trains_as_the_trainer_does(tmp_path):
    """Same initial weights, batches, optimizer, schedule and clipping: the same losses."""
    steps = ["train.max_steps=5", "checkpoint.interval=0", "checkpoint.save_final=false"]
    launch("python", tmp_path / "trainer", *steps)
    subprocess.run([sys.executable, "-m", "llmscale.bench.bare_loop", "+exp=tiny", *QUIET, *steps,
                    f"train.run_dir={tmp_path / 'bare'}"],
                   cwd=REPO_ROOT, env=clean_env(), check=True, capture_output=True, timeout=600)
    trainer, bare = metrics(tmp_path / "trainer", "loss"), metrics(tmp_path / "bare", "loss")
    assert sorted(bare) == sorted(trainer) == [1, 2, 3, 4, 5]
    for step, loss in trainer.items():
        assert bare[step] == pytest.approx(loss, rel=1e-5), step


def test_single_device_benchmark_runs_both_loops_on_the_same_work(tmp_path):
    """tools/bench_overhead.py: per micro-batch size, the engine and the bare loop from the same
    weights on the same batches give the same losses, and the figures follow from the timings."""
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench_overhead.py"), "+exp=tiny",
                    "parallel.zero_stage=0", "train.fused_loss=true", "optim.fused=true",
                    "--micro-batch-sizes", "4", "8", "--steps", "2", "--warmup", "1",
                    "--no-pretrain-check", "--output", str(tmp_path)],
                   cwd=REPO_ROOT, env=clean_env(), check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert [row["micro_batch_size"] for row in report["rows"]] == [4, 8]
    for row in report["rows"]:
        assert "fused loss, fused AdamW" in row["plan"]
        assert len(row["losses"]["llmscale"]) == len(row["losses"]["bare"]) == 3
        assert row["max_loss_diff"] < 1e-5
        assert row["tflops"] / row["bare_tflops"] == pytest.approx(
            row["tokens_per_s"] / row["bare_tokens_per_s"])
    with (tmp_path / "overhead.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 2
