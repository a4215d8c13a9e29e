"""Memory of a training step: peak accelerator memory as a per-step metric beside tokens/s, and
an exact CPU measurement of the bytes of live tensors during one step, which checks
llmscale.parallel.memory_plan against the model (tools/measure_memory.py)."""

import gc
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from llmscale.config.schema import ActivationCheckpointing, ModelConfig, Precision
from llmscale.config.validate import ParallelPlan
from llmscale.models.llama import Llama
from llmscale.parallel.activation_checkpointing import apply_activation_checkpointing
from llmscale.parallel.memory_plan import MemoryEstimate, estimate
from llmscale.parallel.parallelize import parallelize
from llmscale.parallel.topology import init_model_parallel


def peak_memory_metrics(device: torch.device) -> Dict[str, float]:
    """`peak_memory_gib`: the largest `torch.cuda.max_memory_allocated` of any rank so far.

    Every rank must call it (one all-reduce): ranks need not be alike, as pipeline stages are not.
    Nothing on CPU, where rank memory is the process's RSS, which a benchmark reads from outside
    (llmscale.train.bench)."""
    if device.type != "cuda":
        return {}
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"peak_memory_gib": peak.item() / 2**30}


class AllocationTrace:
    """Every allocation and free of PyTorch's CPU allocator while the trace is open, in time
    order, from the profiler's memory events (`profile_memory=True`): the CPU counterpart of
    `torch.cuda.max_memory_allocated`, exact to the byte and blind to what the allocator does
    not serve (the interpreter, oneDNN scratch space). Sizes are relative to the opening: the
    profiler does not see the free of a block allocated before it started, so whatever the
    measured code frees must have been allocated inside the trace.

        with AllocationTrace() as trace, trace.phase("forward"):
            ...
        trace.peak("forward"), trace.live_at_end("forward")
    """

    def __init__(self) -> None:
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._phases: Dict[str, Tuple[int, int]] = {}
        self.events: List[Tuple[int, int]] = []  # (time ns, +bytes allocated / -bytes freed)

    def __enter__(self) -> "AllocationTrace":
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        if exc[0] is None:
            self._collect(self._profiler.profiler.kineto_results.experimental_event_tree())
            self.events.sort()

    def phase(self, name: str):
        """A named span (a profiler range) whose peak and end the trace reports."""
        return record_function(f"llmscale.memory.{name}")

    def _collect(self, nodes) -> None:
        prefix = "llmscale.memory."
        for node in nodes:
            if node.tag == _EventType.Allocation:
                self.events.append((node.start_time_ns, node.extra_fields.alloc_size))
            elif node.name.startswith(prefix):
                self._phases[node.name[len(prefix):]] = (node.start_time_ns, node.end_time_ns)
            self._collect(node.children)

    def _live(self, until_ns: int) -> Iterable[Tuple[int, int]]:
        live = 0
        for time_ns, size in self.events:
            if time_ns > until_ns:
                return
            live += size
            yield time_ns, live

    def peak(self, phase: Optional[str] = None) -> int:
        """The most bytes live at once (relative to the opening), in `phase` or overall."""
        start, end = self._phases[phase] if phase else (0, float("inf"))
        return max([live for time_ns, live in self._live(end) if time_ns >= start], default=0)

    def live_at_end(self, phase: Optional[str] = None) -> int:
        """Bytes live (relative to the opening) when `phase`, or the trace, ends."""
        end = self._phases[phase][1] if phase else float("inf")
        return sum(size for time_ns, size in self.events if time_ns <= end)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@dataclass(frozen=True)
class StepMemory:
    """Bytes of live tensors around one training step (forward, backward, optimizer step)."""

    states: int  # live when the step starts: weights, buffers, optimizer state
    activations: int  # added by the forward pass: what it saved for the backward pass, the loss
    forward_peak: int  # the most added at any moment of the forward pass
    backward_peak: int  # ... of the backward pass (gradients included)
    optimizer_peak: int  # ... of gradient clipping and the optimizer step (gradients included)
    loss: float

    @property
    def peak(self) -> int:
        """The most bytes live at any moment of the step: what a device would need."""
        return self.states + max(self.forward_peak, self.backward_peak, self.optimizer_peak)


def measure_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          loss_fn: Callable[[], torch.Tensor], clip_grad: float = 1.0,
                          warmup_steps: int = 1) -> StepMemory:
    """Run `warmup_steps` steps (so the optimizer state exists, as in every later step), then
    measure one: `loss_fn().backward()`, gradient clipping to `clip_grad`, `optimizer.step()`,
    `optimizer.zero_grad(set_to_none=True)`, the order of llmscale's loops."""

    def train_step(trace: Optional[AllocationTrace]) -> float:
        def phase(name):
            return trace.phase(name) if trace else nullcontext()

        with phase("forward"):
            loss = loss_fn()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup_steps):
        train_step(None)
    optimizer.zero_grad(set_to_none=True)
    # Free earlier garbage now: a collection inside the trace would free blocks it never saw.
    gc.collect()
    optimizer_state = [value for state in optimizer.state.values() for value in state.values()
                       if isinstance(value, torch.Tensor)]
    states = tensor_bytes([*model.parameters(), *model.buffers(), *optimizer_state])
    with AllocationTrace() as trace:
        loss = train_step(trace)
    return StepMemory(
        states=states,
        activations=trace.live_at_end("forward"),
        forward_peak=trace.peak("forward"),
        backward_peak=trace.peak("backward"),
        optimizer_peak=trace.peak("optimizer"),
        loss=loss,
    )


def measure_llama_step(model_cfg: ModelConfig, seq_len: int, micro_batch: int,
                       checkpointing: ActivationCheckpointing,
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> StepMemory:
    """`measure_training_step` of `Llama(model_cfg)` with `checkpointing`, torch AdamW
    (foreach, as on GPUs), in `dtype`, on a micro-batch of random token ids."""
    torch.manual_seed(seed)
    model = Llama(model_cfg).to(dtype)
    apply_activation_checkpointing(model, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    input_ids = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len))
    labels = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len))
    return measure_training_step(model, optimizer, lambda: model(input_ids, labels))


@dataclass(frozen=True)
class EstimateCheck:
    """llmscale.parallel.memory_plan's estimate of one device, one micro-batch, against
    `measure_llama_step`."""

    estimate: MemoryEstimate
    measured: StepMemory

    @property
    def error(self) -> float:
        """(estimate - measured) / measured of the step's peak."""
        return self.estimate.total / self.measured.peak - 1

    @property
    def activation_error(self) -> float:
        """... of the bytes the forward pass saves."""
        return self.estimate.activations / self.measured.activations - 1


def check_estimate(model_cfg: ModelConfig, seq_len: int, micro_batch: int,
                   checkpointing: ActivationCheckpointing,
                   precision: Precision = Precision.fp32) -> EstimateCheck:
    """Measure one step on CPU and estimate it. In bf16 only the activations compare: torch
    AdamW on a bf16 model keeps bf16 moments, not the fp32 master weights and moments the
    estimate counts."""
    plan = ParallelPlan(world_size=1, dp=1, tp=1, pp=1, zero_stage=0,
                        micro_batch_size=micro_batch, grad_accum_steps=1,
                        global_batch_size=micro_batch)
    dtype = torch.float32 if precision == Precision.fp32 else torch.bfloat16
    measured = measure_llama_step(model_cfg, seq_len, micro_batch, checkpointing, dtype)
    return EstimateCheck(estimate(model_cfg, plan, seq_len, precision, checkpointing), measured)


def measure_parallel_llama_step(model_cfg: ModelConfig, plan: ParallelPlan, seq_len: int,
                                dtype: torch.dtype = torch.float32,
                                seed: int = 0) -> StepMemory:
    """`measure_llama_step` of this rank's share of the model under `plan`'s tensor and sequence
    parallelism and activation checkpointing (pp 1, dp 1: every rank is a tensor-parallel
    rank). Needs torch.distributed with `plan.world_size` ranks; every rank builds the model
    and draws the micro-batch from the same seed, as tensor-parallel ranks do. Megatron's global
    buffer, which the sequence-parallel all-gathers reuse from the first step on, counts as
    state: live from then on, it is allocated before the measured step."""
    from megatron.core.parallel_state import get_global_memory_buffer

    init_model_parallel(plan)
    torch.manual_seed(seed)
    model = parallelize(Llama(model_cfg), plan).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    input_ids = torch.randint(0, model_cfg.vocab_size, (plan.micro_batch_size, seq_len))
    labels = torch.randint(0, model_cfg.vocab_size, (plan.micro_batch_size, seq_len))
    buffers = get_global_memory_buffer().buffer
    buffers.clear()  # an earlier model's, maybe larger
    with _collectives_release_their_tensors():
        measured = measure_training_step(model, optimizer, lambda: model(input_ids, labels))
    return replace(measured, states=measured.states + tensor_bytes(buffers.values()))


# The process-group methods torch.distributed's collectives call.
_COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "all_gather_single",
                "allgather_coalesced", "all_gather_single_coalesced", "reduce_scatter",
                "reduce_scatter_single", "reduce_scatter_single_coalesced", "broadcast")


@contextmanager
def _collectives_release_their_tensors():
    """gloo runs a collective on a worker thread, which holds the work, and through it the
    tensors, until a moment after the caller's `wait` returns: when the caller drops a tensor in
    that moment (a row-parallel layer's all-reduced output, added to the residual at once), the
    worker frees it, and the profiler, which hears only the measuring thread's allocator, never
    sees the free. Inside this, every collective waits for its work and lets go of it, then
    returns once nothing else holds its tensors (the worker has let go too), so each is freed
    when the model drops it, on the measuring thread, as it would be with NCCL."""
    from torch._C._distributed_c10d import ProcessGroup, Work

    class Done(Work):
        def wait(self, timeout=None) -> bool:
            return True

        def is_completed(self) -> bool:
            return True

    def uses(storage) -> int:
        return torch._C._storage_Use_Count(storage._cdata)

    def settled(method):
        def collective(group, *args, **kwargs):
            storages = [tensor.untyped_storage() for tensor in _tensors(args)]
            before = [uses(storage) for storage in storages]
            work = method(group, *args, **kwargs)
            work.wait()
            del work
            deadline = time.monotonic() + 10
            while any(uses(storage) > count for storage, count in zip(storages, before)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{method.__name__}: the backend kept its tensors")
                time.sleep(0)
            return Done()
        return collective

    originals = {name: ProcessGroup.__dict__[name] for name in _COLLECTIVES}
    for name, method in originals.items():
        setattr(ProcessGroup, name, settled(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(ProcessGroup, name, method)


def _tensors(args) -> Iterable[torch.Tensor]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from _tensors(arg)


def check_parallel_estimate(model_cfg: ModelConfig, seq_len: int, micro_batch: int,
                            checkpointing: ActivationCheckpointing, sequence_parallel: bool,
                            precision: Precision = Precision.fp32) -> EstimateCheck:
    """`check_estimate` of a tensor-parallel plan over all ranks of torch.distributed (tp = the
    world size; every rank must call it): the rank that measures the most against the
    estimate."""
    tp = dist.get_world_size()
    plan = ParallelPlan(world_size=tp, dp=1, tp=tp, pp=1, zero_stage=0,
                        micro_batch_size=micro_batch, grad_accum_steps=1,
                        global_batch_size=micro_batch, sequence_parallel=sequence_parallel,
                        activation_checkpointing=checkpointing)
    dtype = torch.float32 if precision == Precision.fp32 else torch.bfloat16
    measured = measure_parallel_llama_step(model_cfg, plan, seq_len, dtype)
    ranks = [None] * tp
    dist.all_gather_object(ranks, measured)
    return EstimateCheck(estimate(model_cfg, plan, seq_len, precision, checkpointing),
                         max(ranks, key=lambda memory: memory.peak))
