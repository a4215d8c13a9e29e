"""Typed schema of every llmscale setting.

Hydra composes the YAML groups in `conf/` on top of these dataclasses, so an unknown key or a
value of the wrong type is rejected by OmegaConf with the key's full path before anything runs.
Cross-field rules (divisibility, batch arithmetic) live in `llmscale.config.validate`.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class TokenizerKind(str, Enum):
    byte = "byte"
    sentencepiece = "sentencepiece"
    huggingface = "huggingface"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class AnomalyPolicy(str, Enum):
    skip = "skip"
    rollback = "rollback"
    stop = "stop"


class ActivationCheckpointing(str, Enum):
    # Keep every activation for the backward pass.
    none = "none"
    # Keep each decoder layer's input only and recompute the layer in the backward pass.
    full = "full"
    # Keep the matmul outputs, recompute the cheap element-wise ops between them.
    selective = "selective"


class AdapterKind(str, Enum):
    # Train every weight.
    none = "none"
    # Freeze the base; train low-rank adapters on the target projections (Hu et al. 2021).
    lora = "lora"
    # LoRA on a frozen base stored in 4-bit NF4 (Dettmers et al. 2023); needs torchao.
    qlora = "qlora"


class Objective(str, Enum):
    # Next-token prediction (pretraining, supervised fine-tuning).
    causal = "causal"
    # Preference optimisation on chosen/rejected pairs (the `dpo` settings).
    dpo = "dpo"
    # Masked-token prediction with a bidirectional encoder (BERT).
    mlm = "mlm"


class DPOLoss(str, Enum):
    # -log sigmoid(beta * margin), margin = the policy's log-ratio of chosen over rejected minus
    # the reference's (Rafailov et al. 2023).
    sigmoid = "sigmoid"
    # (margin - 1 / (2 beta))^2 (Azar et al. 2023).
    ipo = "ipo"
    # max(0, 1 - beta * margin) (SLiC, Zhao et al. 2023).
    hinge = "hinge"
    # -log sigmoid(beta * (length-averaged log-prob of chosen - of rejected) - gamma), no
    # reference model (Meng et al. 2024).
    simpo = "simpo"


class EvaluatorTask(str, Enum):
    # Multiple choice by log-likelihood: acc, acc_norm.
    choice = "choice"
    # Greedy answers compared with the expected ones: exact_match.
    exact_match = "exact_match"
    # Held-out loss and perplexity of text files or a prepared dataset.
    perplexity = "perplexity"


class LRDecay(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class ModelConfig:
    name: str = "tiny"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # None means multi-head attention (as many KV heads as query heads).
    num_kv_heads: Optional[int] = None
    intermediate_size: int = 176
    # None: the tokenizer's vocabulary rounded up to `vocab_multiple` (Megatron's padding).
    vocab_size: Optional[int] = None
    vocab_multiple: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # False: every position attends to the whole sequence (a BERT-style encoder, for
    # objective=mlm); true: each attends to the ones before it (a decoder).
    causal: bool = True
    # Mixture of experts (Mixtral-style): 0 keeps the dense SwiGLU feed-forward; N > 0 replaces
    # it in every layer by N SwiGLU experts behind a top-k router.
    num_experts: int = 0
    moe_top_k: int = 2
    # Each expert takes at most capacity_factor x (tokens x top_k / num_experts) tokens of a
    # micro-batch; the rest are dropped (they pass through the residual only).
    moe_capacity_factor: float = 1.25
    # Weight of the load-balancing auxiliary loss added to the language-model loss.
    moe_aux_loss_coef: float = 0.01


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.byte
    # A SentencePiece `.model` (kind=sentencepiece) or a Hugging Face `tokenizer.json`
    # (kind=huggingface).
    path: Optional[str] = None


@dataclass
class BlendSource:
    # A dataset prepared by tools/preprocess_data.py (its `<output>/tokens/<name>` folder of
    # shards) or the path prefix of one .bin/.idx pair from Megatron-LM or GPT-NeoX tooling;
    # relative paths resolve against the repo root.
    path: str = MISSING
    # Relative share of training samples drawn from this dataset.
    weight: float = 1.0


@dataclass
class DataConfig:
    # Text files, directories or glob patterns; relative paths resolve against the repo root.
    paths: List[str] = field(default_factory=lambda: ["data/shakespeare"])
    seq_len: int = 128
    # The held-out tail of the token stream used for validation (for a blend: the share of
    # each dataset's documents).
    val_fraction: float = 0.05
    seed: int = 1234
    # Pre-tokenized datasets mixed by weight; when given, they are trained on instead of `paths`.
    blend: List[BlendSource] = field(default_factory=list)
    # Blends only: the share of each dataset's documents held out as a test split.
    test_fraction: float = 0.0
    # Blends only: where the sample-order index files are cached, shared by ranks and runs.
    index_cache_dir: str = "runs/data_index"
    # Attention and positions restart after every EOD (packed documents do not see each other)
    document_attention: bool = False
    # A prepared chat folder (tools/prepare_sft.py): supervised fine-tuning on its examples,
    # trained on the tokens its loss mask marks, instead of `paths` or `blend`.
    chat: Optional[str] = None
    # Chat data only: several examples per sample (needs document_attention), instead of one
    # example per sample, padded.
    pack: bool = False
    # A prepared preference-pairs folder (`tools/prepare_sft.py --pairs`): objective=dpo trains
    # on its chosen and rejected responses, instead of `paths`.
    pairs: Optional[str] = None


@dataclass
class ParallelConfig:
    # None: data-parallel size is the world size divided by tp * pp.
    dp: Optional[int] = None
    tp: int = 1
    pp: int = 1
    # Expert parallel: the experts of each MoE layer are split over `ep` data-parallel ranks.
    ep: int = 1
    # With tp > 1, shard the activations between the tensor-parallel regions (norms, residual)
    # along the sequence too (Korthikanti et al.); ignored at tp = 1, as Megatron does.
    sequence_parallel: bool = False
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    # Micro-batches per pipeline step (pp > 1): sets train.grad_accum_steps, since each
    # accumulation step is one micro-batch through the pipeline. None: as train.grad_accum_steps.
    pp_microbatches: Optional[int] = None
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # Raw DeepSpeed config keys merged last over the generated config (the escape hatch).
    deepspeed_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: LRDecay = LRDecay.cosine
    clip_grad: float = 1.0
    # torch's fused AdamW kernel (one launch for all parameters). None: on with CUDA.
    fused: Optional[bool] = None


# The projections of a Llama layer, by their Hugging Face names.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# QLoRA's NF4 block: weights per 4-bit code's absmax scale.
NF4_BLOCK_SIZE = 64


@dataclass
class AdapterConfig:
    kind: AdapterKind = AdapterKind.none
    # LoRA: each target projection W becomes W + (alpha / rank) * B A, with A [rank, in] and
    # B [out, rank] trained and W frozen.
    rank: int = 8
    alpha: float = 16.0
    # Dropout on the adapters' input only (PEFT's lora_dropout).
    dropout: float = 0.0
    # Hugging Face module names, as PEFT's target_modules.
    target_modules: List[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))


@dataclass
class DPOConfig:
    loss: DPOLoss = DPOLoss.sigmoid
    # How far the policy may move from the reference: larger keeps it closer (TRL's beta;
    # 0.1 for DPO, about 2 for SimPO).
    beta: float = 0.1
    # The share of pairs assumed to be labelled the wrong way round (conservative DPO, TRL's
    # label_smoothing); sigmoid and simpo only.
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (TRL's simpo_gamma).
    simpo_gamma: float = 0.5


@dataclass
class MaskedLMConfig:
    # The share of ordinary tokens chosen for prediction; of those, 80% become the mask token,
    # 10% a random token, 10% stay (BERT).
    rate: float = 0.15


@dataclass
class EvaluatorConfig:
    """One evaluation of `tools/evaluate.py`, run on the live model every train.eval_interval
    steps and logged as `eval/<name>/<metric>`. Paths are relative to the checkout."""

    task: EvaluatorTask = MISSING
    # The metrics' prefix; None: the stem of `examples` (or of the first `data` entry).
    name: Optional[str] = None
    # choice, exact_match: a JSONL file of examples.
    examples: Optional[str] = None
    # perplexity: text files, folders or globs, or a prepared dataset folder.
    data: List[str] = field(default_factory=list)
    # The first N examples (perplexity: windows); 0: all.
    limit: int = 0
    # choice: the text between context and each choice.
    delimiter: str = " "
    # exact_match: as `tools/evaluate.py exact-match` (chat_template=false is
    # --no-chat-template).
    max_new_tokens: int = 32
    chat_template: bool = True
    contains: bool = False
    first_line: bool = False
    # perplexity: tokens per window (0: the model's max_seq_len), windows per forward.
    seq_len: int = 0
    batch_size: int = 4


@dataclass
class TrainConfig:
    max_steps: int = 100
    # End this launch after this step, with a checkpoint, leaving the schedule (set by
    # max_steps) untouched: for jobs cut into time-limited allocations. None runs to max_steps.
    exit_at_step: Optional[int] = None
    micro_batch_size: int = 8
    global_batch_size: int = 16
    # None: derived as global_batch_size / (micro_batch_size * dp).
    grad_accum_steps: Optional[int] = None
    precision: Precision = Precision.fp32
    # torch.compile each decoder layer, and the output loss, separately. None: on with CUDA
    # where it applies (no tensor parallelism, no MoE, ZeRO below 3).
    compile: Optional[bool] = None
    # The output layer and cross-entropy over chunks of tokens, gradients computed chunk by
    # chunk, so the [tokens, vocab] fp32 logits never exist at once. None: on with CUDA where
    # it applies (no tensor parallelism, whose vocabulary-parallel loss splits the logits).
    fused_loss: Optional[bool] = None
    seed: int = 42
    eval_interval: int = 50
    # Global batches of held-out samples per evaluation (the same samples for any dp size).
    eval_batches: int = 8
    # Evaluations of `tools/evaluate.py` run at every validation (EvaluatorConfig).
    evaluators: List[EvaluatorConfig] = field(default_factory=list)
    log_interval: int = 10
    # "auto" resumes from the newest checkpoint in the run folder, "none" starts fresh,
    # anything else is the path of a checkpoint folder to resume from.
    resume: str = "auto"
    # A weights folder (`tools/convert_checkpoint.py from-hf` writes one) to start a fresh run
    # from: weights only, with a new optimizer and the LR schedule from its warmup. Ignored
    # once the run has a checkpoint to resume from.
    init_from: Optional[str] = None
    run_dir: str = "runs/${name}"
    # What the run does with a step whose loss is not finite or spikes (below). Every policy
    # withholds that step's update. skip: move on to the next batch, the weights, optimizer
    # state and LR schedule as they were (the step counts, its batch is passed over). rollback:
    # reload the newest checkpoint and go on from the batch after the offending one (the batches
    # in between are passed over too, as PaLM did); without a checkpoint yet it skips. stop: end
    # the run with an error naming the step, saving nothing.
    on_anomaly: AnomalyPolicy = AnomalyPolicy.skip
    # A step's loss above spike_factor x the median loss of the last `spike_window` steps that
    # were not anomalies is a spike. Nothing is called a spike before a launch has seen
    # `spike_window` such steps. None: only non-finite losses are anomalies.
    spike_factor: Optional[float] = 3.0
    spike_window: int = 50
    # Anomalies tolerated between two checkpoint saves (skips and rollbacks alike); one more
    # stops the run, which is then not recovering by itself.
    max_anomalies: int = 10
    # How long any collective waits for the other ranks before this rank stops with an error
    # naming itself and its host. It must outlast the longest wait the run has by design: the
    # other ranks wait while rank 0 writes a checkpoint's manifest (checksums of every file) or
    # converts a checkpoint for another layout. 30 minutes, torch's default for gloo.
    collective_timeout_s: float = 1800.0
    # When this file appears, the run saves a checkpoint at the end of the step and exits (the
    # SLURM scripts create it shortly before the time limit, then requeue the job). None: off.
    stop_file: Optional[str] = None
    # Fault injection, for testing failure handling (like Megatron's debug flags): the N-th
    # global batch of the sample order (the one step N trains on if no batch was passed over
    # before) gives a NaN loss, or a loss 100 times too high, on the last rank only. None in
    # real runs.
    inject_nan_at_batch: Optional[int] = None
    inject_spike_at_batch: Optional[int] = None


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "llmscale"
    # "offline" keeps W&B on local disk; "online" needs network and an API key.
    wandb_mode: str = "offline"
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    # Save every `interval` steps (0 disables periodic saves) and at the end of training.
    interval: int = 100
    # None: `<run_dir>/checkpoints`.
    dir: Optional[str] = None
    save_final: bool = True
    # Retention: the newest `keep_last` checkpoints (None: all) plus every step that is a
    # multiple of `keep_every` (None: none).
    keep_last: Optional[int] = 3
    keep_every: Optional[int] = None
    # Resume re-reads every file of the checkpoint against its manifest's SHA-256; false checks
    # sizes only (for checkpoints too large to read twice).
    verify_checksums: bool = True


@dataclass
class LLMScaleConfig:
    name: str = "default"
    # Validate and report the plan, parameter count and FLOPs, then exit without building.
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # What the model is trained to do: `causal` and `mlm` are trained by this build so far.
    objective: Objective = Objective.causal
    dpo: DPOConfig = field(default_factory=DPOConfig)
    mlm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
