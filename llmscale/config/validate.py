"""Cross-field rules checked before any process group starts.

Every rule that fails is reported at once, each naming the fields, their values and a fix, so a
bad plan costs one edit instead of one cluster allocation per mistake.
"""

from typing import List, Optional, Tuple

import torch

from llmscale.config.adapter_rules import adapter_rules
from llmscale.config.evaluator_rules import evaluator_rules
from llmscale.config.load import ConfigError
from llmscale.config.objective_rules import objective_rules
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import AnomalyPolicy, LLMScaleConfig, Objective


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(cfg: LLMScaleConfig, world_size: int) -> ParallelPlan:
    """Check `cfg` for a job of `world_size` ranks and return the resolved plan."""
    # The cross-field rules divide by these sizes, so they run only once all are positive.
    errors = _positive_rules(cfg)
    if errors:
        raise ConfigError(_report(errors))
    errors = [*_anomaly_rules(cfg), *_model_rules(cfg), *_expert_rules(cfg),
              *adapter_rules(cfg), *_fast_path_rules(cfg), *_data_rules(cfg),
              *_optim_rules(cfg), *objective_rules(cfg), *evaluator_rules(cfg)]
    dp, layout_errors = _layout_rules(cfg, world_size)
    accum, batch_errors = _batch_rules(cfg, dp)
    errors += [*layout_errors, *_zero_rules(cfg), *batch_errors]
    if errors:
        raise ConfigError(_report(errors))
    par, train = cfg.parallel, cfg.train
    return ParallelPlan(
        world_size=world_size,
        dp=dp,
        tp=par.tp,
        pp=par.pp,
        zero_stage=par.zero_stage,
        micro_batch_size=train.micro_batch_size,
        grad_accum_steps=accum,
        global_batch_size=train.global_batch_size,
        ep=par.ep,
        sequence_parallel=par.sequence_parallel and par.tp > 1,
        activation_checkpointing=par.activation_checkpointing,
        compile=_resolve(train.compile, _compile_applies(cfg)),
        # DPO sums each sequence's own token losses, which the fused loss does not return.
        fused_loss=_resolve(train.fused_loss,
                            par.tp == 1 and cfg.objective is not Objective.dpo),
        fused_optimizer=_resolve(cfg.optim.fused, True),
    )


def _positive_rules(cfg: LLMScaleConfig) -> List[str]:
    errors: List[str] = []

    def positive(name: str, value: Optional[float]) -> None:
        if value is not None and value <= 0:
            errors.append(f"{name}={value} must be positive")

    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                 "vocab_size", "max_seq_len", "vocab_multiple", "moe_top_k"):
        positive(f"model.{name}", getattr(cfg.model, name))
    for name in ("tp", "pp", "dp", "ep", "pp_microbatches"):
        positive(f"parallel.{name}", getattr(cfg.parallel, name))
    for name in ("max_steps", "exit_at_step", "micro_batch_size", "global_batch_size",
                 "grad_accum_steps", "eval_interval", "eval_batches", "log_interval",
                 "spike_window", "max_anomalies", "collective_timeout_s", "inject_nan_at_batch",
                 "inject_spike_at_batch"):
        positive(f"train.{name}", getattr(cfg.train, name))
    positive("data.seq_len", cfg.data.seq_len)
    positive("optim.lr", cfg.optim.lr)
    positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    positive("checkpoint.keep_every", cfg.checkpoint.keep_every)
    if cfg.checkpoint.interval < 0:
        errors.append(f"checkpoint.interval={cfg.checkpoint.interval} must be >= 0 (0: no periodic saves)")
    return errors


def _anomaly_rules(cfg: LLMScaleConfig) -> List[str]:
    train = cfg.train
    errors = []
    if train.spike_factor is not None and train.spike_factor <= 1:
        errors.append(
            f"train.spike_factor={train.spike_factor} would call ordinary losses spikes: use a "
            "factor above 1 (3 flags a loss three times the recent median), or null to flag "
            "non-finite losses only"
        )
    if train.on_anomaly == AnomalyPolicy.rollback and cfg.checkpoint.interval == 0:
        errors.append(
            "train.on_anomaly=rollback needs checkpoints to roll back to, but checkpoint.interval=0 "
            "saves none during the run: set checkpoint.interval, or train.on_anomaly=skip"
        )
    return errors


def _model_rules(cfg: LLMScaleConfig) -> List[str]:
    """The model's shapes, and how they split over tensor- and pipeline-parallel ranks."""
    model, par, data = cfg.model, cfg.parallel, cfg.data
    errors = []
    kv_heads = model.num_kv_heads or model.num_heads
    if model.hidden_size % model.num_heads:
        errors.append(
            f"model.hidden_size={model.hidden_size} is not divisible by model.num_heads="
            f"{model.num_heads}: pick num_heads from {_divisors(model.hidden_size)}"
        )
    if model.num_heads % kv_heads:
        errors.append(
            f"model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={kv_heads}: "
            f"pick num_kv_heads from {_divisors(model.num_heads)}"
        )
    # Unset num_kv_heads equals num_heads, whose rule already speaks for it.
    for name, value in (("model.num_heads", model.num_heads),
                        ("model.num_kv_heads", model.num_kv_heads),
                        ("model.intermediate_size", model.intermediate_size)):
        if value is not None and value % par.tp:
            errors.append(
                f"parallel.tp={par.tp} does not divide {name}={value}: each tensor-parallel rank "
                f"needs a whole share; use parallel.tp in {_divisors(value)[:8]} or change {name}"
            )
    if model.vocab_size is not None and model.vocab_size % par.tp:
        errors.append(
            f"parallel.tp={par.tp} does not divide model.vocab_size={model.vocab_size}: set "
            "model.vocab_size=null to pad the tokenizer's vocabulary to a multiple of "
            "model.vocab_multiple and tp, or round it up yourself"
        )
    if par.sequence_parallel and par.tp > 1 and data.seq_len % par.tp:
        errors.append(
            f"parallel.sequence_parallel=true splits data.seq_len={data.seq_len} over parallel.tp="
            f"{par.tp} ranks: make data.seq_len a multiple of {par.tp}, or turn it off"
        )
    if par.pp > 1 and model.tie_embeddings:
        errors.append(
            f"model.tie_embeddings=true shares the embedding with the output layer, which sit on "
            f"the first and the last of parallel.pp={par.pp} stages: set parallel.pp=1, or "
            "model.tie_embeddings=false"
        )
    if model.num_layers % par.pp:
        errors.append(
            f"parallel.pp={par.pp} does not divide model.num_layers={model.num_layers}: use "
            f"parallel.pp in {_divisors(model.num_layers)} or change model.num_layers"
        )
    return errors


def _data_rules(cfg: LLMScaleConfig) -> List[str]:
    model, data = cfg.model, cfg.data
    errors = []
    if data.seq_len > model.max_seq_len:
        errors.append(
            f"data.seq_len={data.seq_len} exceeds model.max_seq_len={model.max_seq_len}: "
            f"lower data.seq_len or raise model.max_seq_len"
        )
    if data.blend and data.paths:
        errors.append(
            f"data.blend lists {len(data.blend)} prepared datasets and data.paths lists text files "
            f"{list(data.paths)[:3]}: train on one of them (set data.paths=[] to use the blend)"
        )
    if not data.blend and not data.paths and not data.chat and not data.pairs:
        errors.append("data.paths, data.blend, data.chat and data.pairs are all empty: name text "
                      "files, prepared datasets, a prepared chat folder or preference pairs to "
                      "train on")
    if not 0.0 < data.val_fraction < 1.0:
        errors.append(f"data.val_fraction={data.val_fraction} must lie strictly between 0 and 1")
    return errors + _chat_data_rules(cfg)


def _chat_data_rules(cfg: LLMScaleConfig) -> List[str]:
    data = cfg.data
    errors = []
    if data.chat and data.blend:
        errors.append(
            f"data.chat={data.chat} and data.blend ({len(data.blend)} datasets) are both set: "
            "fine-tune on the chat folder or pretrain on the blend, not both (set data.blend=[] "
            "or data.chat=null)"
        )
    if data.chat and data.paths:
        errors.append(
            f"data.chat={data.chat} and data.paths={list(data.paths)[:3]} are both set: train on "
            "one of them (data=chat sets data.paths=[])"
        )
    if data.chat and cfg.objective is not Objective.causal:
        errors.append(f"data.chat trains the next-token objective, not "
                      f"objective={cfg.objective.value}: set objective=causal")
    if data.pack and not data.chat:
        errors.append("data.pack=true applies to chat data (data.chat); text and blends are "
                      "always packed: set data.pack=false")
    if data.pack and not data.document_attention:
        errors.append(
            "data.pack=true puts several chat examples in one sample, and without "
            "data.document_attention=true they would attend to each other: set "
            "data.document_attention=true, or data.pack=false for one example per sample"
        )
    return errors


def _optim_rules(cfg: LLMScaleConfig) -> List[str]:
    optim = cfg.optim
    errors = []
    if optim.min_lr > optim.lr:
        errors.append(f"optim.min_lr={optim.min_lr} exceeds optim.lr={optim.lr}: lower optim.min_lr")
    if optim.warmup_steps < 0:
        errors.append(
            f"optim.warmup_steps={optim.warmup_steps} must not be negative (0: no warmup)"
        )
    if optim.clip_grad < 0:
        errors.append(
            f"optim.clip_grad={optim.clip_grad} must not be negative (0 turns clipping off)"
        )
    return errors


def _layout_rules(cfg: LLMScaleConfig, world_size: int) -> Tuple[Optional[int], List[str]]:
    """The data-parallel size, derived from the world size where parallel.dp is unset (None
    where tp x pp does not fit the world), and the layout's errors."""
    par = cfg.parallel
    errors = []
    model_parallel = par.tp * par.pp
    dp = par.dp
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
            f"{par.tp} x {par.pp} = {model_parallel}: launch a multiple of {model_parallel} ranks "
            "or lower parallel.tp / parallel.pp"
        )
    elif dp is None:
        dp = world_size // model_parallel
    elif dp * model_parallel != world_size:
        errors.append(
            f"parallel.dp={dp} x parallel.tp={par.tp} x parallel.pp={par.pp} = "
            f"{dp * model_parallel} but the job has {world_size} ranks: set parallel.dp="
            f"{world_size // model_parallel} or leave it null to derive it"
        )
    return dp, errors


def _zero_rules(cfg: LLMScaleConfig) -> List[str]:
    par = cfg.parallel
    errors = []
    if par.zero_stage not in (0, 1, 2, 3):
        errors.append(f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    elif par.zero_stage >= 2 and par.pp > 1:
        errors.append(
            f"parallel.zero_stage={par.zero_stage} cannot shard gradients across pipeline stages "
            f"(parallel.pp={par.pp}): use parallel.zero_stage=1 with pipeline parallelism"
        )
    elif par.zero_stage == 0 and par.pp > 1 and cfg.optim.clip_grad > 0:
        errors.append(
            f"parallel.zero_stage=0 with parallel.pp={par.pp} would clip gradients by the wrong "
            "norm (DeepSpeed's stage-0 clipping counts the first pipeline stage's weights only): "
            "use parallel.zero_stage=1, or optim.clip_grad=0"
        )
    if par.offload_optimizer and par.zero_stage == 0:
        errors.append("parallel.offload_optimizer=true needs parallel.zero_stage >= 1")
    if par.offload_params and par.zero_stage != 3:
        errors.append("parallel.offload_params=true needs parallel.zero_stage=3")
    return errors


def _batch_rules(cfg: LLMScaleConfig, dp: Optional[int]) -> Tuple[Optional[int], List[str]]:
    """The gradient accumulation steps, derived where unset, and the batch arithmetic's errors
    (the expert split over data-parallel ranks among them)."""
    par, train = cfg.parallel, cfg.train
    errors = []
    accum = train.grad_accum_steps
    if par.pp_microbatches is not None:
        if accum is not None and accum != par.pp_microbatches:
            errors.append(
                f"parallel.pp_microbatches={par.pp_microbatches} and train.grad_accum_steps={accum}"
                " disagree: each pipeline micro-batch is one accumulation step, so set only one"
            )
        accum = par.pp_microbatches
    if dp is not None and par.ep > 1 and dp % par.ep:
        errors.append(
            f"parallel.ep={par.ep} does not divide the data-parallel size {dp}: experts are split "
            f"over data-parallel ranks; use parallel.ep in {_divisors(dp)}"
        )
    if dp is not None:
        per_step = train.micro_batch_size * dp
        if accum is None:
            if train.global_batch_size % per_step:
                errors.append(
                    f"train.global_batch_size={train.global_batch_size} is not divisible by "
                    f"train.micro_batch_size x dp = {train.micro_batch_size} x {dp} = {per_step}: "
                    f"set train.global_batch_size to a multiple of {per_step}"
                )
            accum = train.global_batch_size // per_step
        elif per_step * accum != train.global_batch_size:
            fits = train.global_batch_size % per_step == 0
            derived = f" ({train.global_batch_size // per_step})" if fits else ""
            errors.append(
                f"train.global_batch_size={train.global_batch_size} != train.micro_batch_size x "
                f"train.grad_accum_steps x dp = {train.micro_batch_size} x {accum} x {dp} = "
                f"{per_step * accum}: set train.grad_accum_steps=null to derive it{derived}, or "
                "make the product match"
            )
    return accum, errors


def on_cuda() -> bool:
    return torch.cuda.is_available()


def _resolve(switch: Optional[bool], applies: bool) -> bool:
    """An unset fast-path switch is on with CUDA wherever it applies: on a CPU the plain paths
    are as fast, and the ones the tests compare against."""
    return switch if switch is not None else applies and on_cuda()


def _compile_applies(cfg: LLMScaleConfig) -> bool:
    # ZeRO-3 gathers each layer's weights in hooks that split a compiled graph at every layer.
    return (cfg.parallel.tp == 1 and cfg.model.num_experts == 0 and cfg.parallel.zero_stage < 3
            and not cfg.data.document_attention)


def _fast_path_rules(cfg: LLMScaleConfig) -> List[str]:
    errors = []
    if cfg.train.compile and cfg.parallel.tp > 1:
        errors.append(
            f"train.compile=true with parallel.tp={cfg.parallel.tp}: megatron-core's "
            "tensor-parallel layers do not compile (Megatron-LM#2598); set train.compile=false "
            "or parallel.tp=1"
        )
    if cfg.train.compile and cfg.data.document_attention:
        errors.append(
            "train.compile=true with data.document_attention=true: the document lengths of each "
            "batch are plain integers a compiled layer would be recompiled for; set "
            "train.compile=false or data.document_attention=false"
        )
    if cfg.train.fused_loss and cfg.parallel.tp > 1:
        errors.append(
            f"train.fused_loss=true with parallel.tp={cfg.parallel.tp}: the vocabulary-parallel "
            "loss already keeps only 1/tp of the logits per rank; set train.fused_loss=false"
        )
    return errors


def _expert_rules(cfg: LLMScaleConfig) -> List[str]:
    model, par = cfg.model, cfg.parallel
    errors = []
    if model.num_experts < 0:
        errors.append(f"model.num_experts={model.num_experts} must be >= 0 (0: a dense model)")
    if model.num_experts == 0:
        if par.ep > 1:
            errors.append(
                f"parallel.ep={par.ep} splits experts, but the model is dense "
                "(model.num_experts=0): set parallel.ep=1, or pick an MoE model (model=moe_tiny)"
            )
        return errors
    if model.moe_top_k > model.num_experts:
        errors.append(
            f"model.moe_top_k={model.moe_top_k} exceeds model.num_experts={model.num_experts}: "
            "route each token to at most num_experts experts"
        )
    if model.num_experts % par.ep:
        errors.append(
            f"parallel.ep={par.ep} does not divide model.num_experts={model.num_experts}: use "
            f"parallel.ep in {_divisors(model.num_experts)}"
        )
    if model.moe_capacity_factor <= 0:
        errors.append(f"model.moe_capacity_factor={model.moe_capacity_factor} must be positive")
    if par.tp > 1 or par.pp > 1:
        errors.append(
            f"an MoE model (model.num_experts={model.num_experts}) trains with data and expert "
            f"parallelism only in this build, not with parallel.tp={par.tp} / parallel.pp="
            f"{par.pp}: set both to 1 and use parallel.ep"
        )
    if par.zero_stage == 3:
        errors.append(
            "parallel.zero_stage=3 is not supported by DeepSpeed's MoE layers: use "
            "parallel.zero_stage 0, 1 or 2 with an MoE model"
        )
    return errors


def _report(errors: List[str]) -> str:
    return "invalid configuration:\n" + "\n".join(f"  - {error}" for error in errors)
