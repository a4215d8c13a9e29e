"""QLoRA under tensor parallelism through the real launcher: each of 2 ranks quantises its own
shard of the base to NF4, so the run learns what one process's LoRA run does on that
shard-rounded base (every projection quantised shard by shard, dequantised and put back
together: the same frozen values, the same adapters); stopped and resumed on the same layout,
the uninterrupted run bit for bit (the base quantised again from `train.init_from`)."""

import pytest
import torch
from launching import launch, metrics
from test_lora_runs import assert_holds_the_adapters_alone, saved_weights
from test_qlora_runs import MODEL

from llmscale.adapters import nf4
from llmscale.adapters.lora import is_adapter
from llmscale.checkpoint.checkpointer import find_latest_checkpoint
from llmscale.checkpoint.hf import save_weights
from llmscale.eval.model_source import load_model
from llmscale.models import Llama
from llmscale.parallel.adapter_memory import COLUMN_PARALLEL

pytestmark = pytest.mark.slow

STEPS, TP = 4, 2
# Adam's eps is raised from 1e-8 (as in test_lora_runs' tensor-parallel test): tensor
# parallelism sums the split layers in another order, which moves gradient entries that nearly
# cancel by a part of themselves, and with eps far below |g| Adam steps such an entry by about
# the learning rate whatever its size. Measured, the adapters' largest difference from one
# process: 3.3e-5 at eps 1e-8 (2 entries above 1e-5), 1.2e-5 at 1e-6 (1 entry), 2.0e-6 at 1e-5;
# the losses are equal at every eps.
COMMON = ["adapter.dropout=0", f"model.intermediate_size={MODEL.intermediate_size}",
          f"train.max_steps={STEPS}", "optim.lr=1e-2", "optim.warmup_steps=1", "optim.eps=1e-5",
          "checkpoint.interval=0", "train.eval_batches=1"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shard_rounded(weights):
    """`weights` with each projection quantised as TP ranks hold it: shard by shard."""
    rounded = dict(weights)
    for name, tensor in weights.items():
        module = name.split(".")[-2]
        if module in PROJECTIONS:
            dim = 0 if module in COLUMN_PARALLEL else 1
            rounded[name] = torch.cat([nf4.dequantize(nf4.quantize(shard))
                                       for shard in tensor.chunk(TP, dim=dim)], dim=dim)
    return rounded


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The base the QLoRA runs start from, and its shard-rounded twin for the reference."""
    torch.manual_seed(7)
    weights = Llama(MODEL).state_dict()
    folder = tmp_path_factory.mktemp("bases")
    return (save_weights(weights, MODEL, folder / "base"),
            save_weights(shard_rounded(weights), MODEL, folder / "rounded"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, bases):
    """One process, LoRA on the shard-rounded base."""
    run_dir = tmp_path_factory.mktemp("lora-rounded")
    launch("python", run_dir, "adapter=lora", *COMMON, f"train.init_from={bases[1]}")
    return run_dir


@pytest.fixture(scope="module", params=[
    [f"parallel.tp={TP}"], [f"parallel.tp={TP}", "parallel.sequence_parallel=true"],
], ids=["tp2", "tp2-sequence-parallel"])
def qlora_run(request, tmp_path_factory, bases):
    """QLoRA on 2 tensor-parallel ranks, from the base itself: (its run folder, its settings)."""
    settings = ["adapter=qlora", *COMMON, *request.param, f"train.init_from={bases[0]}"]
    run_dir = tmp_path_factory.mktemp("qlora-tp")
    launch("torchrun", run_dir, *settings)
    return run_dir, settings


def test_qlora_at_tp2_matches_one_process(qlora_run, reference_run):
    losses, reference = metrics(qlora_run[0], "loss"), metrics(reference_run, "loss")
    assert reference[STEPS] < reference[1] - 0.1, reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, expected in reference.items():
        assert abs(losses[step] - expected) / abs(expected) < 1e-5, (step, losses[step], expected)
    (step_dir, saved), (_, expected) = saved_weights(qlora_run[0]), saved_weights(reference_run)
    assert_holds_the_adapters_alone(step_dir)
    adapters = {name: tensor for name, tensor in expected.items() if is_adapter(name)}
    assert saved.keys() == adapters.keys() and len(adapters) == 28
    for name, tensor in adapters.items():
        assert (saved[name] - tensor).abs().max() < 1e-5, name


def test_qlora_at_tp2_resumes_exactly_on_the_same_layout(qlora_run, tmp_path):
    run_dir, settings = qlora_run
    launch("torchrun", tmp_path, *settings, "train.exit_at_step=2")
    assert_holds_the_adapters_alone(find_latest_checkpoint(tmp_path / "checkpoints"))
    assert "resuming from" in launch("torchrun", tmp_path, *settings)
    resumed, uninterrupted = metrics(tmp_path, "loss"), metrics(run_dir, "loss")
    assert [resumed[step] for step in (3, 4)] == [uninterrupted[step] for step in (3, 4)]
    (_, saved), (_, expected) = saved_weights(tmp_path), saved_weights(run_dir)
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.items())


def test_qlora_at_tp2_is_lora_at_tp2_on_the_shard_rounded_base(qlora_run, bases, tmp_path):
    """Bit for bit: the NF4 shards dequantise to the rounded base's shards, and the layers sum
    in the same order; the differences from one process above are tensor parallelism's. The
    model evaluation loads from the QLoRA run merges its adapters into the same rounded base."""
    run_dir, settings = qlora_run
    lora = [item.replace("adapter=qlora", "adapter=lora").replace(str(bases[0]), str(bases[1]))
            for item in settings]
    launch("torchrun", tmp_path, *lora)
    assert metrics(tmp_path, "loss") == metrics(run_dir, "loss")
    (_, saved), (_, expected) = saved_weights(tmp_path), saved_weights(run_dir)
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.items())
    evaluated, expected = load_model(run_dir).model, load_model(tmp_path).model.state_dict()
    assert all(torch.equal(tensor, expected[name])
               for name, tensor in evaluated.state_dict().items())
