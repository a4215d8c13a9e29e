"""`train.evaluators` in a real tiny run: at every validation the run logs `eval/<name>/<metric>`,
and each value is the one `tools/evaluate.py` reports on the checkpoint saved at that step;
`--log-to-run` appends the command's results to the run's metrics.jsonl under the same names."""

import json
import re

import pytest
from launching import REPO_ROOT, launch

from llmscale.checkpoint.checkpointer import step_dir_name
from llmscale.config import ConfigError, load_config, validate
from llmscale.eval.cli import main

STEPS = 4
EVALUATORS = ("[{task:choice,name:lines,examples:data/eval/next_line.jsonl,limit:8,delimiter:''},"
              "{task:perplexity,data:[data/shakespeare/tempest.txt],seq_len:64,limit:6},"
              "{task:exact_match,examples:data/eval/next_speaker.jsonl,limit:3,"
              "max_new_tokens:4,contains:true}]")
# The same evaluations from the command line, by the names the run logs them under.
COMMANDS = {
    "lines": ["choice", "--examples", "data/eval/next_line.jsonl", "--limit", "8",
              "--delimiter", "", "--name", "lines"],
    "tempest": ["perplexity", "--data", "data/shakespeare/tempest.txt", "--seq-len", "64",
                "--max-windows", "6"],
    "next_speaker": ["exact-match", "--examples", "data/eval/next_speaker.jsonl", "--limit",
                     "3", "--max-new-tokens", "4", "--contains"],
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluated-run")
    launch("python", run_dir, f"train.max_steps={STEPS}", "train.eval_interval=2",
           "train.eval_batches=1", "checkpoint.interval=2", "checkpoint.keep_last=null",
           "optim.warmup_steps=1", f"train.evaluators={EVALUATORS}")
    return run_dir


def logged(run_dir, name):
    return {record["step"]: record[name] for record in map(json.loads,
            (run_dir / "metrics.jsonl").read_text().splitlines()) if name in record}


def command_metrics(model, name, tmp_path, *options):
    output = tmp_path / f"{name}.json"
    assert main([COMMANDS[name][0], str(model), "--output", str(output), *COMMANDS[name][1:],
                 *options]) == 0
    return json.loads(output.read_text())["metrics"]


def test_the_run_logs_what_the_command_reports_on_its_checkpoints(run_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    losses = logged(run_dir, "eval/tempest/loss")
    assert sorted(losses) == [0, 2, 4] and losses[4] < losses[0]
    for step in (2, 4):
        checkpoint = run_dir / "checkpoints" / step_dir_name(step)
        choice = command_metrics(checkpoint, "lines", tmp_path)
        assert logged(run_dir, "eval/lines/acc")[step] == choice["acc"]
        assert logged(run_dir, "eval/lines/acc_norm")[step] == choice["acc_norm"]
        assert logged(run_dir, "eval/lines/examples")[step] == 8
        perplexity = command_metrics(checkpoint, "tempest", tmp_path)
        assert losses[step] == pytest.approx(perplexity["loss"], rel=1e-6)
        assert logged(run_dir, "eval/tempest/windows")[step] == 6
        exact = command_metrics(checkpoint, "next_speaker", tmp_path)
        assert logged(run_dir, "eval/next_speaker/exact_match")[step] == exact["exact_match"]
    # Settings echoed as flags are not metrics.
    assert "eval/next_speaker/contains" not in json.loads(
        (run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_log_to_run_appends_at_the_checkpoints_step(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    checkpoint = run_dir / "checkpoints" / step_dir_name(2)
    metrics = command_metrics(checkpoint, "tempest", tmp_path, "--log-to-run", str(run_dir),
                              "--name", "again")
    command_metrics(checkpoint, "tempest", tmp_path, "--log-to-run", str(run_dir), "--step",
                    "7", "--name", "again")
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before
    appended = [json.loads(line) for line in after[len(before):]]
    assert [record["step"] for record in appended] == [2, 7]
    assert appended[0]["eval/again/loss"] == metrics["loss"]
    assert appended[0]["eval/again/loss"] == pytest.approx(
        logged(run_dir, "eval/tempest/loss")[2], rel=1e-6)
    assert set(appended[0]) == {"step", "eval/again/loss", "eval/again/perplexity",
                                "eval/again/tokens", "eval/again/windows", "eval/again/seq_len"}


def test_log_to_run_refuses_a_folder_that_is_no_run(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    code = main(["perplexity", str(run_dir), "--data", "data/shakespeare/tempest.txt",
                 "--log-to-run", str(tmp_path)])
    assert code != 0
    error = capsys.readouterr().err
    assert f"--log-to-run {tmp_path}: not a training run" in error
    assert "perplexity of" not in capsys.readouterr().out  # refused before evaluating


def test_step_without_log_to_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["choice", "runs/any", "--examples", "data/eval/next_line.jsonl", "--step", "3"])
    assert "--step is the step --log-to-run logs at" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.evaluators=[{task:choice,examples:data/eval/missing.jsonl}]",
     "train.evaluators[0].examples=data/eval/missing.jsonl: no such file"),
    ("train.evaluators=[{task:perplexity}]", "train.evaluators[0].data is empty"),
    ("train.evaluators=[{task:exact_match}]", "train.evaluators[0].examples is not set"),
    ("train.evaluators=[{task:choice,examples:data/eval/next_line.jsonl},"
     "{task:choice,examples:data/eval/next_line.jsonl}]",
     "2 evaluators log as eval/next_line/: give each its own `name`"),
])
def test_evaluators_are_checked_before_the_run(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config(["+exp=tiny", override]), 1)


def test_a_split_model_is_refused():
    cfg = load_config(["+exp=tiny", "parallel.tp=2",
                       "train.evaluators=[{task:choice,examples:data/eval/next_line.jsonl}]"])
    with pytest.raises(ConfigError, match="run the whole model on each rank"):
        validate(cfg, 2)


def test_an_unknown_task_is_refused_by_name():
    with pytest.raises(ConfigError, match="Invalid value 'mmlu', expected one of "
                                          r"\[choice, exact_match, perplexity\]"):
        load_config(["+exp=tiny", "train.evaluators=[{task:mmlu,examples:x.jsonl}]"])


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_two_ranks_log_what_the_command_reports(zero_stage, tmp_path, monkeypatch):
    """ZeRO-1 splits the examples over the ranks (5 examples, 5 windows in 3 batches: uneven
    shares); ZeRO-3 runs every example on every rank, its layers gathered in step."""
    run_dir = tmp_path / "run"
    launch("torchrun", run_dir, "train.max_steps=2", "train.eval_interval=2",
           "train.eval_batches=1", "checkpoint.interval=2", "optim.warmup_steps=1",
           f"parallel.zero_stage={zero_stage}",
           "train.evaluators=[{task:choice,name:lines,examples:data/eval/next_line.jsonl,"
           "limit:5,delimiter:''},{task:perplexity,data:[data/shakespeare/tempest.txt],"
           "seq_len:64,limit:5,batch_size:2},{task:exact_match,"
           "examples:data/eval/next_speaker.jsonl,limit:3,max_new_tokens:4,contains:true}]")
    monkeypatch.chdir(REPO_ROOT)
    checkpoint = run_dir / "checkpoints" / step_dir_name(2)
    choice = command_metrics(checkpoint, "lines", tmp_path, "--limit", "5")
    perplexity = command_metrics(checkpoint, "tempest", tmp_path, "--max-windows", "5",
                                 "--batch-size", "2")
    exact = command_metrics(checkpoint, "next_speaker", tmp_path)
    assert logged(run_dir, "eval/lines/acc_norm")[2] == choice["acc_norm"]
    assert logged(run_dir, "eval/lines/examples")[2] == 5
    assert logged(run_dir, "eval/tempest/loss")[2] == pytest.approx(perplexity["loss"],
                                                                     rel=1e-6)
    assert logged(run_dir, "eval/tempest/windows")[2] == 5
    assert logged(run_dir, "eval/next_speaker/exact_match")[2] == exact["exact_match"]
