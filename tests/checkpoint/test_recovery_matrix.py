"""Every parallel plan through every recovery path, 2-4 CPU ranks, the tiny model.

Per plan, one uninterrupted reference run and one run that goes through the paths in turn, each
launch the same command as the one before (as a requeue does):
  1. (d) a NaN loss at batch 3 rolls back to the step-2 checkpoint; (e) then the stop file
     appears: the run saves and exits; (a) the next launch resumes on the same layout;
  2. (b) one rank is SIGKILLed between checkpoints;
  3. (c) the whole run is SIGKILLed during a save;
  4. (f) a launch on another layout: it finishes the run, or is refused naming the saved
     layout, and then the same layout finishes it.
Every loss any launch logs equals the reference's bit for bit (within 1e-5 on another layout).
The reference skips the NaN batch (`train.on_anomaly=skip`, proven equal to a run that never saw
the batch in tests/train/test_anomaly_runs.py): the rolled-back run's step s then equals the
reference's step s + 1, the same weights, Adam state and learning rate on the same batch.

`make test-slow` runs the plans marked for CI; `make test-matrix` runs them all.
`PYTHONPATH=tests python tests/checkpoint/test_recovery_matrix.py` prints the README's support
table, which `test_readme_table_is_the_matrix` keeps equal to this file."""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from launching import (
    REPO_ROOT, clean_env, kill_when, launch, metric_lines, metrics, pretrain_command, start,
    wait_for,
)

STEPS, INTERVAL, NAN_BATCH = 10, 2, 3
COMMON = (f"train.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}",
          f"train.inject_nan_at_batch={NAN_BATCH}", "model.tie_embeddings=false",
          "train.eval_batches=1")
PATHS = ("(a) stop, resume", "(b) kill a rank", "(c) kill in a save", "(d) NaN rollback",
         "(e) stop file", "(f) other layout")
SELECTIVE = "parallel.activation_checkpointing=selective"
# Without dropout: each layout draws its own dropout masks, so another layout's losses differ.
LORA = ("adapter=lora", "adapter.dropout=0")
# NF4 quantises in blocks of 64: the tiny model's MLP widened to 6 x 64.
QLORA = ("adapter=qlora", "adapter.dropout=0", "model.intermediate_size=384")


@dataclass(frozen=True)
class Plan:
    name: str
    ranks: int
    overrides: Tuple[str, ...]
    # (f): the layout a relaunch takes, in words and as launch arguments.
    other_layout: str
    other_ranks: int
    other_overrides: Tuple[str, ...]
    refusal: Optional[str] = None  # what the refusal of the other layout says, if refused
    in_ci: bool = False


PLANS = [
    Plan("dp2 ZeRO-0", 2, ("parallel.zero_stage=0",), "1 rank, ZeRO-1", 1,
         ("parallel.zero_stage=1",),
         refusal="Changing the layout is supported between ZeRO stages 1, 2 and 3"),
    Plan("dp2 ZeRO-1, selective recompute", 2, ("parallel.zero_stage=1", SELECTIVE),
         "1 rank, ZeRO-2", 1, ("parallel.zero_stage=2", SELECTIVE)),
    Plan("dp2 ZeRO-2", 2, ("parallel.zero_stage=2",), "1 rank, ZeRO-3", 1,
         ("parallel.zero_stage=3",)),
    Plan("dp2 ZeRO-3", 2, ("parallel.zero_stage=3",), "1 rank, ZeRO-1", 1,
         ("parallel.zero_stage=1",), in_ci=True),
    Plan("tp2, selective recompute", 2, ("parallel.tp=2", SELECTIVE), "1 rank", 1, (SELECTIVE,),
         in_ci=True),
    Plan("tp2 + sequence parallel", 2, ("parallel.tp=2", "parallel.sequence_parallel=true"),
         "pp2", 2, ("parallel.pp=2",)),
    Plan("pp2, selective recompute", 2, ("parallel.pp=2", SELECTIVE), "tp2", 2,
         ("parallel.tp=2", SELECTIVE)),
    Plan("tp2 x pp2", 4, ("parallel.tp=2", "parallel.pp=2"), "pp2", 2, ("parallel.pp=2",)),
    Plan("ep2 (MoE)", 2, ("model=moe_tiny", "parallel.ep=2"), "1 rank, ep1", 1,
         ("model=moe_tiny",), refusal="changing the expert-parallel size is not supported",
         in_ci=True),
    Plan("LoRA dp2 ZeRO-2", 2, (*LORA, "parallel.zero_stage=2"), "1 rank, ZeRO-1", 1,
         (*LORA, "parallel.zero_stage=1")),
    Plan("LoRA tp2", 2, (*LORA, "parallel.tp=2"), "1 rank", 1, LORA),
    Plan("QLoRA dp2 ZeRO-1", 2, (*QLORA, "parallel.zero_stage=1"), "1 rank, ZeRO-2", 1,
         (*QLORA, "parallel.zero_stage=2")),
]


def _param(plan: Plan):
    marks = [pytest.mark.slow] + ([] if plan.in_ci else [pytest.mark.matrix])
    return pytest.param(plan, id=plan.name.split(",")[0].replace(" ", ""), marks=marks)


def _records(run_dir: Path, first_line: int = 0) -> List[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[first_line:]
    return [record for record in map(json.loads, lines) if "loss" in record]


def _logged_after(run_dir: Path, first_line: int, condition) -> bool:
    return (run_dir / "metrics.jsonl").exists() and any(
        condition(record) for record in _records(run_dir, first_line))


def _compare(records: List[dict], reference: Dict[int, float], offset: int,
             tolerance: float) -> None:
    """Each record's loss against the reference's at `step + offset` (the last step has none
    after the rollback)."""
    for record in records:
        step = record["step"] + offset
        if step in reference:
            expected = reference[step]
            assert abs(record["loss"] - expected) <= tolerance * abs(expected), (
                record["step"], record["loss"], expected)


@pytest.mark.parametrize("plan", [_param(plan) for plan in PLANS])
def test_every_recovery_path_continues_the_uninterrupted_run(plan: Plan, tmp_path):
    reference_dir, run_dir, stop_file = tmp_path / "reference", tmp_path / "run", tmp_path / "stop"
    layout = [*COMMON, *plan.overrides]
    launch("torchrun", reference_dir, *layout, ranks=plan.ranks)
    reference = metrics(reference_dir, "loss")
    command = [*layout, "train.on_anomaly=rollback", f"train.stop_file={stop_file}"]
    checkpoints = run_dir / "checkpoints"

    # 1. NaN rollback, then the stop file once a step after the rollback is logged.
    process = start("torchrun", run_dir, *command, ranks=plan.ranks)
    wait_for(process, lambda: _logged_after(run_dir, 0, lambda r: r.get("action") == "rollback"))
    lines = metric_lines(run_dir)
    wait_for(process, lambda: _logged_after(run_dir, lines, lambda r: True))
    stop_file.touch()
    assert process.wait(timeout=600) == 0, "the stop file did not end the run cleanly"
    records = _records(run_dir)
    [anomaly] = [r for r in records if "anomaly" in r]
    assert (anomaly["step"], anomaly["action"]) == (NAN_BATCH, "rollback")
    stopped_at = records[-1]["step"]
    assert (checkpoints / f"step_{stopped_at:08d}").is_dir()

    # 2. One rank SIGKILLed right after an odd step: between two checkpoints.
    lines = metric_lines(run_dir)
    kill_when(start("torchrun", run_dir, *command, ranks=plan.ranks),
              lambda: _logged_after(run_dir, lines, lambda r: r["step"] % INTERVAL),
              one_rank=True)
    # 3. The whole run SIGKILLed while a save is being written.
    saved = {p.name for p in checkpoints.iterdir()}
    kill_when(start("torchrun", run_dir, *command, ranks=plan.ranks),
              lambda: any(p.name not in saved for p in checkpoints.glob("step_*.partial")))
    assert list(checkpoints.glob("step_*.partial")), "the kill did not land inside a save"

    # 4. Another layout: supported, or refused naming the saved one; then the same layout.
    same_layout_records = len(_records(run_dir))
    other = pretrain_command("torchrun" if plan.other_ranks > 1 else "python", run_dir,
                             *COMMON, *plan.other_overrides, "train.on_anomaly=rollback",
                             f"train.stop_file={stop_file}", ranks=plan.other_ranks)
    result = subprocess.run(other, cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                            text=True, timeout=900)
    if plan.refusal:
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        assert "llmscale: error: checkpoint" in result.stderr
        assert plan.refusal in result.stderr
        assert "relaunch with the saved layout (parallel.dp=2," in result.stderr
        assert "Traceback" not in result.stderr
        launch("torchrun", run_dir, *command, ranks=plan.ranks)
        same_layout_records = len(_records(run_dir))
    else:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "converting it to a universal checkpoint" in result.stdout
        _compare(_records(run_dir)[same_layout_records:], reference, offset=1, tolerance=1e-5)

    # Every loss a launch on the plan's own layout logged, bit for bit.
    records = _records(run_dir)
    assert records[-1]["step"] == STEPS
    same_layout = records[:same_layout_records]
    rollback = same_layout.index(anomaly)
    _compare(same_layout[:rollback], reference, offset=0, tolerance=0.0)
    _compare(same_layout[rollback + 1:], reference, offset=1, tolerance=0.0)


def support_table() -> str:
    rows = ["| plan | " + " | ".join(PATHS) + " |", "|---" * (len(PATHS) + 1) + "|"]
    for plan in PLANS:
        other = (f"refused, naming the saved layout: {plan.refusal}" if plan.refusal
                 else f"yes (to {plan.other_layout})")
        rows.append(f"| {plan.name} | " + " | ".join(["yes"] * 5 + [other]) + " |")
    return "\n".join(rows)


def test_readme_table_is_the_matrix():
    assert support_table() in (REPO_ROOT / "README.md").read_text(), (
        "the README's support table differs from the matrix: paste the output of "
        "`PYTHONPATH=tests python tests/checkpoint/test_recovery_matrix.py` into it")


if __name__ == "__main__":
    print(support_table())
