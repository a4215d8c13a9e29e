"""Measured memory of a training step: an exact CPU measurement of the bytes of live tensors during
one step, of the whole model or of one tensor-parallel rank's share, which checks the estimate of
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

from llmscale.adapters.lora import apply_lora
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import ActivationCheckpointing, AdapterConfig, ModelConfig, Precision
from llmscale.models.llama import Llama
from llmscale.parallel.activation_checkpointing import apply_activation_checkpointing
from llmscale.parallel.memory_plan import MemoryEstimate, estimate
from llmscale.parallel.parallelize import parallelize
from llmscale.parallel.topology import init_model_parallel


class AllocationTrace:
    """Every allocation and free of PyTorch's CPU allocator while the trace is open, in time
    order, from the profiler's memory events (`profile_memory=True`): the CPU counterpart of
    `torch.cuda.max_memory_allocated`, exact to the byte and blind to what the allocator does
    not serve (the interpreter, oneDNN scratch space) and to what other threads free. Sizes are
    relative to the opening: the profiler does not see the free of a block allocated before it
    started, so whatever the measured code frees must have been allocated inside the trace.
    What a collective allocates for itself is left out, as the device's collectives would not
    allocate it (gloo copies a reduce-scatter's input; NCCL reads it in place).

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
            allocations = []  # (time ns, bytes, address, inside a collective)
            self._collect(self._profiler.profiler.kineto_results.experimental_event_tree(),
                          allocations, False)
            collectives_own = set()  # addresses: the block's free is left out too
            for time_ns, size, address, in_collective in sorted(allocations):
                if size > 0 and in_collective:
                    collectives_own.add(address)
                    continue
                if address in collectives_own:
                    # Its free, or (freed by the backend's thread, unseen) a new block there.
                    collectives_own.remove(address)
                    if size < 0:
                        continue
                self.events.append((time_ns, size))

    def phase(self, name: str):
        """A named span (a profiler range) whose peak and end the trace reports."""
        return record_function(f"llmscale.memory.{name}")

    def _collect(self, nodes, allocations, in_collective: bool) -> None:
        prefix = "llmscale.memory."
        for node in nodes:
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                allocations.append((node.start_time_ns, fields.alloc_size, fields.ptr,
                                    in_collective))
            elif node.name.startswith(prefix):
                self._phases[node.name[len(prefix):]] = (node.start_time_ns, node.end_time_ns)
            self._collect(node.children, allocations,
                          in_collective or node.name.startswith("c10d::"))

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
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once; a
    tensor subclass made of inner tensors, as QLoRA's NF4 weights are, by those)."""
    storages = {}

    def add(tensor: torch.Tensor) -> None:
        if hasattr(tensor, "__tensor_flatten__"):
            for name in tensor.__tensor_flatten__()[0]:
                add(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()

    for tensor in tensors:
        add(tensor)
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
    # Allocated in the step and never seen freed: 0, as the step frees all it allocates, unless
    # the trace missed a free (made on another thread).
    unfreed: int = 0

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
        unfreed=trace.live_at_end(),
    )


def measure_llama_step(model_cfg: ModelConfig, seq_len: int, micro_batch: int,
                       checkpointing: ActivationCheckpointing,
                       dtype: torch.dtype = torch.float32, seed: int = 0,
                       adapter: Optional[AdapterConfig] = None) -> StepMemory:
    """`measure_training_step` of `Llama(model_cfg)` with `checkpointing`, torch AdamW
    (foreach, as on GPUs), in `dtype`, on a micro-batch of random token ids; with `adapter`
    (LoRA, QLoRA) applied, training the adapters only."""
    torch.manual_seed(seed)
    model = Llama(model_cfg).to(dtype)
    if adapter is not None:
        apply_lora(model, adapter)
        model.to(dtype)  # the adapters, made in the default dtype
    apply_activation_checkpointing(model, checkpointing)
    return measure_training_step(*_optimizer_and_loss(model, model_cfg, micro_batch, seq_len))


def _optimizer_and_loss(model: torch.nn.Module, model_cfg: ModelConfig, micro_batch: int,
                        seq_len: int):
    """torch AdamW (foreach, as on GPUs) and the loss of a micro-batch of random token ids,
    drawn from the generator as it stands (the same on every rank after the same seed)."""
    trained = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, foreach=True)
    input_ids = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len))
    labels = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len))
    return model, optimizer, lambda: model(input_ids, labels)


@dataclass(frozen=True)
class EstimateCheck:
    """llmscale.parallel.memory_plan's estimate of one device, one micro-batch, against
    `measure_llama_step` or `measure_parallel_llama_step`."""

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

    @property
    def step_error(self) -> float:
        """... of what the step adds to the states (the weights, the optimizer state, kept
        buffers) at its fullest: activations, gradients and temporaries (see `check_estimate`
        for bf16)."""
        estimate = self.estimate
        added = estimate.total - estimate.parameters - estimate.optimizer - estimate.buffers
        return added / (self.measured.peak - self.measured.states) - 1


def check_estimate(model_cfg: ModelConfig, seq_len: int, micro_batch: int,
                   checkpointing: ActivationCheckpointing,
                   precision: Precision = Precision.fp32,
                   adapter: Optional[AdapterConfig] = None) -> EstimateCheck:
    """Measure one step on CPU and estimate it. In bf16 the peaks do not compare: torch AdamW on
    a bf16 model keeps bf16 moments, not the fp32 master weights and moments the estimate
    counts, and its step's temporary is bf16 too; the activations do, and so does the step
    beyond the states where its fullest moment is in the backward pass."""
    plan = _measured_plan(1, micro_batch, False, checkpointing)
    measured = measure_llama_step(model_cfg, seq_len, micro_batch, checkpointing,
                                  _dtype(precision), adapter=adapter)
    return EstimateCheck(estimate(model_cfg, plan, seq_len, precision, checkpointing, adapter),
                         measured)


def measure_parallel_llama_step(model_cfg: ModelConfig, plan: ParallelPlan, seq_len: int,
                                dtype: torch.dtype = torch.float32, seed: int = 0,
                                attempts: int = 5) -> StepMemory:
    """`measure_llama_step` of this rank's share of the model under `plan`'s tensor and sequence
    parallelism and activation checkpointing (pp 1, dp 1: every rank is a tensor-parallel
    rank). Needs torch.distributed with `plan.world_size` ranks; every rank builds the model
    and draws the micro-batch from the same seed, as tensor-parallel ranks do. Megatron's global
    buffer, which the sequence-parallel all-gathers reuse from the first step on, counts as
    state: live from then on, it is allocated before the measured step. A step whose trace
    missed a free (see `_collectives_release_their_tensors`) is measured again, up to
    `attempts` steps."""
    from megatron.core.parallel_state import get_global_memory_buffer

    init_model_parallel(plan)
    torch.manual_seed(seed)
    step = _optimizer_and_loss(parallelize(Llama(model_cfg), plan).to(dtype), model_cfg,
                               plan.micro_batch_size, seq_len)
    buffers = get_global_memory_buffer().buffer
    buffers.clear()  # an earlier model's, maybe larger
    for _ in range(attempts):
        with _collectives_release_their_tensors():
            measured = measure_training_step(*step)
        # Every rank measures again if any missed a free, so their collectives stay matched.
        unfreed = torch.tensor(measured.unfreed)
        dist.all_reduce(unfreed, op=dist.ReduceOp.MAX)
        if unfreed.item() == 0:
            break
    else:
        raise RuntimeError(f"the trace missed a free in each of {attempts} steps")
    return replace(measured, states=measured.states + tensor_bytes(buffers.values()))


def check_parallel_estimate(model_cfg: ModelConfig, seq_len: int, micro_batch: int,
                            checkpointing: ActivationCheckpointing, sequence_parallel: bool,
                            precision: Precision = Precision.fp32) -> EstimateCheck:
    """`check_estimate` of a tensor-parallel plan over all ranks of torch.distributed (tp = the
    world size; every rank must call it): the rank that measures the most against the
    estimate."""
    tp = dist.get_world_size()
    plan = _measured_plan(tp, micro_batch, sequence_parallel, checkpointing)
    measured = measure_parallel_llama_step(model_cfg, plan, seq_len, _dtype(precision))
    ranks = [None] * tp
    dist.all_gather_object(ranks, measured)
    return EstimateCheck(estimate(model_cfg, plan, seq_len, precision, checkpointing),
                         max(ranks, key=lambda memory: memory.peak))


def _measured_plan(tp: int, micro_batch: int, sequence_parallel: bool,
                   checkpointing: ActivationCheckpointing) -> ParallelPlan:
    """What the measurements run: one micro-batch, ZeRO-0, every rank tensor-parallel."""
    return ParallelPlan(world_size=tp, dp=1, tp=tp, pp=1, zero_stage=0,
                        micro_batch_size=micro_batch, grad_accum_steps=1,
                        global_batch_size=micro_batch, sequence_parallel=sequence_parallel,
                        activation_checkpointing=checkpointing)


def _dtype(precision: Precision) -> torch.dtype:
    return torch.float32 if precision == Precision.fp32 else torch.bfloat16


WORKER_SETTLE_S = 0.001
HOLDER_WAIT_S = 0.05
# The process-group methods torch.distributed's collectives call.
_COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "all_gather_single",
                "allgather_coalesced", "all_gather_single_coalesced", "reduce_scatter",
                "reduce_scatter_single", "reduce_scatter_single_coalesced", "broadcast")


@contextmanager
def _collectives_release_their_tensors():
    """gloo runs a collective on a worker thread, which holds the work, and through it the
    tensors, until a moment after the caller's `wait` returns, and is busy with it a moment
    longer: a tensor the caller drops in that moment (a row-parallel layer's all-reduced output,
    added to the residual at once) is freed there, or its free goes unrecorded, and the profiler
    never sees it. Inside this, every collective waits for its work, lets go of it, and returns
    once nothing else holds its tensors and the worker has had a millisecond to finish, so each
    is freed when the model drops it, on the measuring thread, as it would be with NCCL.
    `measure_parallel_llama_step` checks that nothing went unseen all the same."""
    from torch._C._distributed_c10d import ProcessGroup, Work

    class Done(Work):
        def wait(self, timeout=None) -> bool:
            return True

        def is_completed(self) -> bool:
            return True

    def holders(tensors, storages) -> List[int]:
        """References to each tensor and to each storage (a view is one to its storage)."""
        return ([tensor._use_count() for tensor in tensors]
                + [torch._C._storage_Use_Count(storage._cdata) for storage in storages])

    def settled(method):
        def collective(group, *args, **kwargs):
            tensors = list(_tensors(args))
            storages = [tensor.untyped_storage() for tensor in tensors]
            before = holders(tensors, storages)
            work = method(group, *args, **kwargs)
            work.wait()
            del work
            # A holder that stays is not the backend's: selective checkpointing keeps an
            # all-reduce's output, which is its input.
            deadline = time.monotonic() + HOLDER_WAIT_S
            while any(now > then for now, then in zip(holders(tensors, storages), before)):
                if time.monotonic() > deadline:
                    break
                time.sleep(0)
            time.sleep(WORKER_SETTLE_S)
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
