"""QLoRA runs through the real launcher, started from a weights folder (`train.init_from`): 2
ranks learn what 1 process does; checkpoints hold no copy of the NF4 base, so a stopped run
resumes exactly only by quantising the weights folder again; the adapters export to PEFT."""

import pytest
import torch
from launching import launch, load_tool, metrics
from safetensors.torch import load_file
from test_lora_runs import saved_weights

from llmscale.adapters.lora import PEFT_PREFIX, is_adapter
from llmscale.checkpoint.hf import save_weights
from llmscale.config.schema import ModelConfig
from llmscale.models import Llama

pytestmark = pytest.mark.slow

STEPS = 4
# The tiny experiment with an intermediate size of whole NF4 blocks (6 x 64).
MODEL = ModelConfig(name="tiny", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=384, vocab_size=320, max_seq_len=256, tie_embeddings=True)
COMMON = ["adapter=qlora", "adapter.dropout=0",
          f"model.intermediate_size={MODEL.intermediate_size}", f"train.max_steps={STEPS}",
          "optim.lr=1e-2", "optim.warmup_steps=1", "checkpoint.interval=0", "train.eval_batches=1"]


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """Unlike the run's own seeded initial weights: a resume that did not reload them shows."""
    torch.manual_seed(7)
    return save_weights(Llama(MODEL).state_dict(), MODEL, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, base_weights):
    """1 process, ZeRO-1 (the default), 2 micro-batches of 8 a step."""
    run_dir = tmp_path_factory.mktemp("qlora")
    launch("python", run_dir, *COMMON, f"train.init_from={base_weights}")
    return run_dir


def test_two_ranks_match_one_process_and_save_no_base(qlora_run, base_weights, tmp_path):
    launch("torchrun", tmp_path, *COMMON, f"train.init_from={base_weights}")
    losses, reference = metrics(tmp_path, "loss"), metrics(qlora_run, "loss")
    assert reference[STEPS] < reference[1] - 0.1, reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, expected in reference.items():
        assert abs(losses[step] - expected) / abs(expected) < 1e-5, (step, losses[step], expected)
    (_, saved), (_, expected) = saved_weights(tmp_path), saved_weights(qlora_run)
    assert saved.keys() == expected.keys()
    assert not any(name.endswith("proj.weight") for name in saved)  # no base projection
    for name, tensor in expected.items():
        assert (saved[name] - tensor).abs().max() < 1e-5, name


def test_stop_and_resume_equals_the_uninterrupted_run(qlora_run, base_weights, tmp_path):
    start = [*COMMON, f"train.init_from={base_weights}"]
    launch("python", tmp_path, *start, "train.exit_at_step=2")
    stdout = launch("python", tmp_path, *start)
    assert "resuming from" in stdout and "step_00000002" in stdout
    resumed, expected = metrics(tmp_path, "loss"), metrics(qlora_run, "loss")
    for step in range(3, STEPS + 1):
        assert resumed[step] == expected[step], step
    (_, saved), (_, reference) = saved_weights(tmp_path), saved_weights(qlora_run)
    for name, tensor in reference.items():
        assert torch.equal(saved[name], tensor), name


def test_the_adapters_export_to_peft_and_the_base_to_hf_is_refused(qlora_run, tmp_path, capsys):
    tool = load_tool()
    assert tool.main(["to-peft", str(qlora_run), str(tmp_path / "peft")]) == 0
    assert "(QLoRA rank 8" in capsys.readouterr().out
    exported = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    _, saved = saved_weights(qlora_run)
    adapters = {PEFT_PREFIX + name: tensor for name, tensor in saved.items() if is_adapter(name)}
    assert exported.keys() == adapters.keys() and len(adapters) == 28
    assert all(torch.equal(exported[name], adapters[name]) for name in adapters)
    assert tool.main(["to-hf", "--merge", str(qlora_run), str(tmp_path / "merged")]) == 2
    assert "NF4-rounded base" in capsys.readouterr().err
    assert tool.main(["to-hf", str(qlora_run), str(tmp_path / "base")]) == 2
    assert "holds the adapters, not the frozen base" in capsys.readouterr().err
