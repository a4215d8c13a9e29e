"""The benchmark's plans, validated before anything runs, and its report: table, CSV, JSON, PNG."""

import csv
import json

import pytest

from llmscale.bench.plans import (
    BARE, Measurement, Row, Run, measured_row, plan_overrides, plan_runs,
)
from llmscale.bench.report import (
    format_table, plot_tokens_per_s, tokens_per_s_chart, write_csv, write_json,
)
from llmscale.config import ConfigError


def test_plans_are_short_specs_hydra_overrides_or_both() -> None:
    assert plan_overrides("zero3") == ["parallel.zero_stage=3"]
    assert plan_overrides("dp2-zero1") == ["parallel.dp=2", "parallel.zero_stage=1"]
    assert plan_overrides("parallel.zero_stage=2") == ["parallel.zero_stage=2"]
    assert plan_overrides("dp2-zero3 parallel.offload_optimizer=true") == [
        "parallel.dp=2", "parallel.zero_stage=3", "parallel.offload_optimizer=true"]
    assert plan_overrides("tp2-pp2-ep1") == ["parallel.tp=2", "parallel.pp=2", "parallel.ep=1"]
    for bad in ("zero", "dp2_zero1", "fsdp2", ""):
        with pytest.raises(ConfigError, match="dpN, tpN, ppN, epN, zeroN|empty"):
            plan_overrides(bad)


def test_each_plan_and_micro_batch_is_a_run_compared_with_one_bare_run_per_workload() -> None:
    pairs = plan_runs(["+exp=tiny"], ["zero0", "dp2-zero1", "zero1 train.precision=bf16"],
                      [4, 8], total_steps=6, nproc_per_node=1)
    assert [(run.plan, run.micro_batch_size, run.world_size) for run in pairs] == [
        ("zero0", 4, 1), ("zero0", 8, 1), ("dp2-zero1", 4, 2), ("dp2-zero1", 8, 2),
        ("zero1 train.precision=bf16", 4, 1), ("zero1 train.precision=bf16", 8, 1)]
    bare_runs = set(pairs.values())
    assert len(bare_runs) == 4  # fp32 and bf16, each at micro-batch 4 and 8
    assert all(bare.plan == BARE and bare.world_size == 1 for bare in bare_runs)
    for run, bare in pairs.items():
        assert bare.micro_batch_size == run.micro_batch_size
        assert bare.global_batch_size == run.global_batch_size == 16
        assert ("train.precision=bf16" in bare.overrides) == ("bf16" in run.plan)
        for setting in ("train.max_steps=6", "checkpoint.interval=0",
                        "checkpoint.save_final=false", "train.resume=none"):
            assert setting in run.overrides
        command = run.command(run_dir="RUN")
        assert command[-1] == "train.run_dir=RUN"
        assert command[command.index("--nproc_per_node") + 1] == str(run.world_size)


def test_every_bad_plan_is_reported_before_anything_runs() -> None:
    with pytest.raises(ConfigError) as error:
        plan_runs(["+exp=tiny"], ["zero1", "pp2-zero3", "dp4"], [8], total_steps=6,
                  nproc_per_node=2)
    message = str(error.value)
    assert "plan 'pp2-zero3', micro-batch 8:" in message and "parallel.zero_stage=3" in message
    assert "plan 'dp4', micro-batch 8:" in message and "global_batch_size" in message
    assert "'zero1'" not in message


def test_the_ratio_to_the_bare_loop_is_per_device() -> None:
    """Issue 14: dp2-zero1 on 2 ranks at 23,707 tokens/s against the bare loop's 20,921 on one
    device is 0.57x per device (1.13x was the ratio of totals)."""
    run = Run("dp2-zero1", ("parallel.dp=2",), 2, 4, 16)
    bare = Measurement(20921.0, 0.060, None, None, [0.4])
    row = measured_row(run, Measurement(23707.0, 0.034, None, None, [0.5, 0.5]), bare)
    assert row.tokens_per_s == 23707.0
    assert row.tokens_per_s_per_device == 23707.0 / 2
    assert row.vs_bare == pytest.approx(0.567, abs=1e-3)
    assert row.bare_tokens_per_s == 20921.0
    bare_row = measured_row(Run(BARE, (), 1, 4, 16), bare, bare)
    assert (bare_row.tokens_per_s_per_device, bare_row.vs_bare) == (20921.0, 1.0)
    failed = measured_row(run, "exit status 1", bare)
    assert (failed.error, failed.tokens_per_s_per_device, failed.vs_bare) == (
        "exit status 1", None, None)


def _rows():
    bare = Row(BARE, 1, 4, 16, tokens_per_s=1000.0, tokens_per_s_per_device=1000.0,
               tflops_per_device=0.5, peak_rss_gib=0.4, bare_tokens_per_s=1000.0, vs_bare=1.0,
               rss_gib_per_rank=[0.4])
    plan = Row("dp2-zero1", 2, 4, 16, tokens_per_s=1900.0, tokens_per_s_per_device=950.0,
               tflops_per_device=0.475, mfu=0.31, peak_memory_gib=1.5, peak_rss_gib=0.5,
               bare_tokens_per_s=1000.0, vs_bare=0.95, rss_gib_per_rank=[0.5, 0.45])
    failed = Row("zero3", 2, 4, 16, error="exit status 1:\nCUDA out of memory")
    return [bare, plan, failed]


def test_the_table_has_a_line_per_run_and_shows_what_is_unknown() -> None:
    lines = format_table(_rows()).splitlines()
    assert lines[0].split() == ["plan", "ranks", "micro", "global", "tokens/s", "tokens/s/dev",
                                "TFLOP/s/dev", "MFU", "mem", "GiB/rank", "RSS", "GiB/rank",
                                "dev", "vs", "bare"]
    assert lines[1].split()[:2] == ["bare", "PyTorch"] and "n/a" in lines[1]
    assert lines[2].split() == ["dp2-zero1", "2", "4", "16", "1,900", "950", "0.475", "31.0%",
                                "1.50", "0.50", "0.95"]
    assert lines[3].split() == ["zero3", "2", "4", "16", "failed"]
    assert lines[4] == "zero3, micro-batch 4: exit status 1:"


def test_csv_json_and_png(tmp_path) -> None:
    rows = _rows()
    write_csv(rows, tmp_path / "bench.csv")
    write_json(rows, {"steps": 3}, tmp_path / "bench.json")
    plot_tokens_per_s(rows, "tiny", tmp_path / "bench.png")
    with (tmp_path / "bench.csv").open() as file:
        records = list(csv.DictReader(file))
    assert [record["plan"] for record in records] == [BARE, "dp2-zero1", "zero3"]
    assert float(records[1]["vs_bare"]) == 0.95 and records[1]["mfu"] == "0.31"
    assert (records[1]["tokens_per_s"], records[1]["tokens_per_s_per_device"]) == (
        "1900.0", "950.0")
    assert records[2]["tokens_per_s"] == "" and "out of memory" in records[2]["error"]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["steps"] == 3
    assert report["rows"][1]["rss_gib_per_rank"] == [0.5, 0.45]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_shows_tokens_per_s_per_device_labelled_with_the_ratio() -> None:
    axes = tokens_per_s_chart(_rows(), "tiny").axes[0]
    heights = [bar.get_height() for bar in axes.containers[0]]
    labels = [text.get_text() for text in axes.texts]
    assert heights == [1000.0, 950.0] and labels == ["1.00x", "0.95x"]
    assert axes.get_ylabel() == "tokens/s per device (median)"
