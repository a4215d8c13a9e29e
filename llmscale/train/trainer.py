"""The pretraining run, top to bottom: set up, then the loop of batch, step, measure, evaluate,
checkpoint."""

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from omegaconf import OmegaConf

from llmscale.adapters.lora import describe_trainable
from llmscale.checkpoint.checkpointer import (
    Checkpointer, ResumeSource, check_frozen_base, prepare_resume, resolve_resume,
)
from llmscale.checkpoint.frozen_base import base_fingerprint, initial_weights_dir
from llmscale.checkpoint.hf import load_initial_weights
from llmscale.checkpoint.state import TrainState
from llmscale.config.load import REPO_ROOT, ConfigError, to_yaml
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import AdapterKind, AnomalyPolicy, DPOLoss, LLMScaleConfig, Objective
from llmscale.config.validate import validate
from llmscale.data import (
    GlobalSampleOrder, Tokenizer, document_position_ids, rank_micro_batches,
)
from llmscale.data.sampler import micro_batch_positions
from llmscale.data.tokenizer import mask_token_id
from llmscale.data.build import build_datasets, resolve_vocab_size
from llmscale.data.chat_samples import ChatSamples
from llmscale.data.preference_pairs import PreferencePairs
from llmscale.eval.in_training import TrainingEvaluators
from llmscale.eval.preference_validation import evaluate_preferences
from llmscale.eval.validation import evaluate
from llmscale.models import Llama, flops_per_token
from llmscale.objectives.masked_lm import MaskedLMBatches
from llmscale.objectives.preference_batch import with_reference
from llmscale.parallel.distributed import init_distributed, read_world_size
from llmscale.parallel.engine import build_engine
from llmscale.parallel.parallelize import parallelize
from llmscale.parallel.topology import init_model_parallel
from llmscale.tracking.sinks import Metrics, build_sinks
from llmscale.train.anomaly import (
    Anomaly, LossGuard, TrainingStopped, roll_back, summarize,
)
from llmscale.train.fault_injection import inject_loss_faults
from llmscale.train.preference_step import preference_train_step
from llmscale.train.reference_logps import reference_logps
from llmscale.train.step import train_step
from llmscale.train.step_metrics import FinishedStep, collect, step_collectors
from llmscale.train.stop_file import StopFile
from llmscale.train.throughput import ThroughputMeter, peak_tflops


@dataclass
class RunSummary:
    run_dir: Path
    state: TrainState
    # The held-out figure the summary reports: perplexity, or for DPO the reward accuracy.
    val_name: str
    first_val: float
    last_val: float
    last_checkpoint: Path
    anomalies: List[Anomaly]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(cfg: LLMScaleConfig) -> RunSummary:
    # The config and the resume target are checked before any process group starts.
    plan = validate(cfg, read_world_size())
    run_dir = Path(cfg.train.run_dir)
    checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    resume_from = resolve_resume(cfg.train.resume, checkpoint_dir,
                                 cfg.checkpoint.verify_checksums)
    # An adapter run's checkpoints hold no copy of its frozen base: a resume makes it again from
    # where the start got it (QLoRA's quantised again), before loading the adapters.
    reload_base = cfg.adapter.kind is not AdapterKind.none
    init_from = (initial_weights_dir(cfg.train.init_from, resume_from)
                 if not resume_from or reload_base else None)
    # ... and only on the base its adapters were trained on.
    frozen_base = base_fingerprint(cfg.train, init_from) if reload_base else None
    if resume_from and frozen_base:
        check_frozen_base(resume_from, frozen_base, cfg.train)

    if plan.tp > 1:
        # Megatron's tensor-parallel layers rely on one CUDA work queue to keep their
        # communication and computation in issue order (Megatron's launch scripts set it too);
        # read when CUDA starts, so before the process group.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    process = init_distributed(cfg.train.collective_timeout_s)
    dp_rank = init_model_parallel(plan)
    train_set, val_set, tokenizer = build_datasets(cfg, REPO_ROOT)
    cfg.model.vocab_size = resolve_vocab_size(cfg.model, tokenizer.vocab_size, plan.tp)
    num_val_batches = _count_validation_batches(val_set, plan, cfg.train.eval_batches)
    train_order = GlobalSampleOrder(len(train_set), cfg.data.seed)
    masked_lm = _masked_lm_batches(cfg, tokenizer) if cfg.objective is Objective.mlm else None
    val_batches = _validation_batches(val_set, plan, num_val_batches, dp_rank, masked_lm)
    resume_source = prepare_resume(resume_from, plan, process.rank) if resume_from else None
    seed_everything(cfg.train.seed)
    model = _build_model(cfg, init_from, tokenizer.eod_id)
    engine = build_engine(parallelize(model, plan, cfg.adapter), cfg, plan)
    config_yaml = to_yaml(cfg)
    checkpointer = Checkpointer(cfg.checkpoint, checkpoint_dir, process.rank, plan, config_yaml,
                                frozen_base)
    state = checkpointer.load(engine, resume_source) if resume_source else TrainState()
    preference = cfg.objective is Objective.dpo
    # An adapter run's reference is its frozen base, a forward with the adapters off at each
    # step; a full fine-tuning run's, its initial weights' log-probs, cached once.
    adapter_model = engine.module if reference_from_base(cfg) else None
    reference = None
    if preference and cfg.dpo.loss is not DPOLoss.simpo and adapter_model is None:
        reference = reference_logps(
            engine, cfg, REPO_ROOT, (train_set, val_set), plan, dp_rank, process.device,
            resumed=resume_source is not None, is_main=process.is_main,
            report=partial(_print_on_main, process.is_main))
    if preference:
        val_batches = with_reference(val_batches, reference)
    guard = LossGuard(cfg.train)
    stop_file = StopFile(cfg.train.stop_file, process.is_main, process.device)
    rollback_source = resume_source
    if process.rank == process.world_size - 1:  # a fault on one rank, that every rank must answer
        inject_loss_faults(model, cfg.train, plan.global_batch_size, lambda: state.consumed_samples)

    # A preference pair is two sequences.
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len * (2 if preference else 1)
    meter = ThroughputMeter(
        flops_per_token(cfg.model, cfg.data.seq_len), process.world_size, peak_tflops(process.device)
    )
    collectors = step_collectors(engine, model, meter, process.device)
    sinks = []
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        sinks = build_sinks(
            cfg.logging, run_dir, cfg.name, OmegaConf.to_container(OmegaConf.structured(cfg)),
            cfg.train.max_steps, state.step, cfg.train.log_interval,
        )
        print(f"llmscale: {plan.describe()}; run folder {run_dir.resolve()}"
              + (f"; resuming from {resume_from}" if resume_from else ""))
        if isinstance(train_set, (ChatSamples, PreferencePairs)):
            kind = "preference pairs" if preference else "chat data"
            print(f"llmscale: {kind}: {train_set.describe()}; {val_set.describe()}")
        if cfg.adapter.kind is not AdapterKind.none:
            print(f"llmscale: {describe_trainable(model)}")
        if state.step >= cfg.train.max_steps:
            print(f"llmscale: {resume_from} is already at train.max_steps={cfg.train.max_steps}; "
                  "raise train.max_steps to train on, or set a new train.run_dir to start afresh")

    def log(metrics: Metrics) -> None:
        for sink in sinks:
            sink.log(state.step, metrics)

    # The masked-LM accuracy reads whole logits, which one-stage, one-shard plans have.
    validation = (partial(evaluate_preferences, engine, val_batches, process.device, cfg.dpo,
                          adapter_model)
                  if preference else
                  partial(evaluate, engine, val_batches, process.device,
                          masked_lm is not None and plan.tp == plan.pp == 1,
                          global_token_mean=bool(cfg.data.chat)))
    evaluators = TrainingEvaluators(cfg.train.evaluators, model, tokenizer, plan, dp_rank,
                                    process.device, run_dir, REPO_ROOT)

    def validate_run() -> Metrics:
        return {**validation(), **evaluators()}

    first_val = validate_run() if state.step == 0 else None
    if first_val:
        log(first_val)
    last_val = first_val
    last_checkpoint = resume_from

    last_step = min(cfg.train.max_steps, cfg.train.exit_at_step or cfg.train.max_steps)
    while state.step < last_step:
        batches = _step_batches(train_set, train_order, state.consumed_samples, plan,
                                plan.grad_accum_steps, dp_rank, masked_lm)
        lr = engine.get_lr()[0]
        start = time.perf_counter()
        check_loss = partial(guard.check, state.step + 1, newest_checkpoint=(
            rollback_source.step_dir if rollback_source else None))
        objective_metrics = {}
        if preference:
            loss, anomaly, objective_metrics = preference_train_step(
                engine, with_reference(batches, reference), process.device, check_loss, cfg.dpo,
                adapter_model)
        else:
            loss, anomaly = train_step(engine, batches, process.device, check_loss,
                                       global_token_mean=bool(cfg.data.chat))
        seconds = time.perf_counter() - start

        state.step += 1
        state.consumed_samples += plan.global_batch_size
        state.consumed_tokens += tokens_per_step
        log(collect(collectors, FinishedStep(loss, lr, seconds, tokens_per_step,
                                             state.consumed_tokens, anomaly, objective_metrics)))
        if anomaly:
            if anomaly.action is AnomalyPolicy.stop:
                raise TrainingStopped(anomaly.describe())
            if process.is_main:
                print(f"llmscale: {anomaly.describe()}")
            if anomaly.action is AnomalyPolicy.rollback:
                state = roll_back(engine, checkpointer, rollback_source, state, cfg.data.seq_len)
                continue  # the restored step was evaluated and saved before

        finished = state.step == last_step
        stopping = stop_file.requested()
        if state.step % cfg.train.eval_interval == 0 or finished:
            last_val = validate_run()
            log(last_val)
        if (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0) or (
            finished and cfg.checkpoint.save_final
        ) or stopping:
            last_checkpoint = checkpointer.save(engine, state)
            rollback_source = ResumeSource(last_checkpoint, universal=False)
            guard.checkpoint_saved()
        if stopping:
            if process.is_main:
                print(f"llmscale: {stop_file.path} appeared: saved step {state.step} and stopped; "
                      "the same command resumes from there")
            break

    for sink in sinks:
        sink.close()
    val_key = "val_rewards/accuracies" if preference else "val_ppl"
    summary = RunSummary(
        run_dir=run_dir,
        state=state,
        val_name="held-out reward accuracy" if preference else "validation perplexity",
        first_val=first_val[val_key] if first_val else float("nan"),
        last_val=last_val[val_key] if last_val else float("nan"),
        last_checkpoint=last_checkpoint,
        anomalies=guard.anomalies,
    )
    if process.is_main:
        _print_summary(summary, cfg)
    dist.barrier()
    return summary


def _build_model(cfg: LLMScaleConfig, init_from: Optional[Path], eod_id: int) -> Llama:
    """On the meta device, so that each rank allocates and draws only its own share
    (`parallelize`), unless whole weights come first: loaded ones, or MoE experts, which expert
    parallelism copies out of the whole model."""
    whole_model_first = init_from is not None or cfg.model.num_experts > 0
    with nullcontext() if whole_model_first else torch.device("meta"):
        model = Llama(cfg.model)
    if init_from:
        load_initial_weights(model, init_from)
    if cfg.data.document_attention:  # before `parallelize`: pipeline stages carry the positions
        model.use_document_attention(partial(document_position_ids, eod_id=eod_id))
    return model


def _count_validation_batches(val_set: Dataset, plan: ParallelPlan,
                              eval_batches: int) -> int:
    """`eval_batches` global batches, or as many as the split holds."""
    num_batches = min(eval_batches, len(val_set) // plan.global_batch_size)
    if num_batches == 0:
        raise ConfigError(
            f"the validation split holds {len(val_set)} samples, fewer than one global batch of "
            f"train.global_batch_size={plan.global_batch_size}: raise data.val_fraction or lower "
            "train.global_batch_size"
        )
    return num_batches


def _validation_batches(val_set: Dataset, plan: ParallelPlan, num_batches: int,
                        dp_rank: int, masked_lm: Optional[MaskedLMBatches]):
    """The same held-out samples (and masks) at every evaluation and for every data-parallel
    size."""
    order = GlobalSampleOrder(len(val_set), seed=0, shuffle=False)
    return _step_batches(val_set, order, 0, plan, num_batches * plan.grad_accum_steps, dp_rank,
                         masked_lm)


def _step_batches(dataset: Dataset, order: GlobalSampleOrder, consumed_samples: int,
                  plan: ParallelPlan, num_micro_batches: int, dp_rank: int,
                  masked_lm: Optional[MaskedLMBatches]):
    """This rank's next micro-batches: next-token pairs, or masked-LM ones."""
    batches = rank_micro_batches(dataset, order, consumed_samples, plan.micro_batch_size,
                                 num_micro_batches, dp_rank, plan.dp)
    if masked_lm is None:
        return batches
    return masked_lm(batches, micro_batch_positions(
        consumed_samples, plan.micro_batch_size, num_micro_batches, dp_rank, plan.dp))


def _masked_lm_batches(cfg: LLMScaleConfig, tokenizer: Tokenizer) -> MaskedLMBatches:
    try:
        mask_id = mask_token_id(tokenizer)
    except ValueError as error:
        raise ConfigError(f"objective=mlm with tokenizer.kind={cfg.tokenizer.kind.value}: "
                          f"{error}") from None
    return MaskedLMBatches(mask_id, tokenizer.vocab_size, [tokenizer.eod_id], cfg.data.seed,
                           cfg.mlm.rate)


def reference_from_base(cfg: LLMScaleConfig) -> bool:
    """DPO's reference is the frozen base with the adapters off, computed on the fly (simpo
    has none)."""
    return (cfg.objective is Objective.dpo and cfg.dpo.loss is not DPOLoss.simpo
            and cfg.adapter.kind is not AdapterKind.none)


def _print_on_main(is_main: bool, line: str) -> None:
    if is_main:
        print(f"llmscale: {line}")


def _print_summary(summary: RunSummary, cfg: LLMScaleConfig) -> None:
    run_dir = summary.run_dir.resolve()
    lines = [
        f"llmscale: trained {summary.state.step} steps, "
        f"{summary.state.consumed_tokens:,} tokens",
        _describe_validation(summary),
        f"  run folder:  {run_dir}",
        f"  metrics:     {run_dir / 'metrics.jsonl'}" if cfg.logging.jsonl else None,
        f"  tensorboard: {run_dir / 'tensorboard'}" if cfg.logging.tensorboard else None,
        f"  checkpoint:  {summary.last_checkpoint.resolve()}" if summary.last_checkpoint else None,
        f"  anomalies:   {summarize(summary.anomalies)}" if summary.anomalies else None,
    ]
    print("\n".join(line for line in lines if line))


def _describe_validation(summary: RunSummary) -> str:
    last = f"{summary.last_val:.2f} at step {summary.state.step}"
    if math.isnan(summary.first_val):  # a resumed run did not see step 0
        return f"  {summary.val_name}: {last}"
    return f"  {summary.val_name}: {summary.first_val:.2f} at step 0 -> {last}"
