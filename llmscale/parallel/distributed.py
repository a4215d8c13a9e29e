"""Process-group start-up that works the same under `deepspeed`, `torchrun` and plain `python`."""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llmscale.config.schema import TrainConfig


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _set_single_process_defaults() -> None:
    """A plain `python` launch sets no rendezvous variables; without them DeepSpeed falls back
    to MPI discovery and asks for mpi4py."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~2 minutes on first use)
    that only its inference all-reduce calls; training collectives go through gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cpu_threads_per_rank(local_world_size: int) -> int:
    """The machine's cores shared out among the ranks running on it."""
    return max(1, (os.cpu_count() or 1) // local_world_size)


def _set_cpu_threads(local_world_size: int) -> None:
    """The `deepspeed` launcher leaves OMP_NUM_THREADS unset, so co-located CPU ranks would
    each take every core and oversubscribe the machine."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads_per_rank(local_world_size))


def _time_out_every_group(timeout: timedelta) -> None:
    """`new_group` called without a timeout takes torch's backend default (30 minutes for gloo,
    10 for NCCL), not the default group's. DeepSpeed creates its data-parallel groups that way,
    so a hang inside ZeRO's collectives would outlast the configured timeout: point torch's
    defaults at it before any group exists."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def init_distributed(
    collective_timeout_s: float = TrainConfig.collective_timeout_s,
) -> DistributedContext:
    """`collective_timeout_s`: how long any collective, in every process group, waits for the
    other ranks before it raises (see `collective_timeout_message`)."""
    import deepspeed

    _set_single_process_defaults()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = read_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _skip_deepspeed_shm_build()
        _set_cpu_threads(local_world_size)
    if not dist.is_initialized():
        timeout = timedelta(seconds=collective_timeout_s)
        _time_out_every_group(timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timeout)
    return DistributedContext(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        local_world_size=local_world_size,
        device=device,
    )


def end_distributed() -> None:
    """Call once a process is done with its collectives. Gloo's worker threads, left to the
    interpreter's own shutdown, can abort a process whose work succeeded (SIGABRT, exit -6)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def is_collective_timeout(error: BaseException) -> bool:
    """Gloo raises a plain RuntimeError ("Timed out waiting 10000ms for recv operation to
    complete") once a collective has waited out its group's timeout. (NCCL's watchdog instead
    ends the process itself after the same timeout, with its own message.)"""
    return isinstance(error, RuntimeError) and "Timed out waiting" in str(error)


def collective_timeout_message(collective_timeout_s: float) -> str:
    return (
        f"llmscale: error: rank {os.environ.get('RANK', '0')} on host {socket.gethostname()}: a "
        f"collective did not complete within train.collective_timeout_s={collective_timeout_s:g} s;"
        " another rank probably died or hung (see its log). If the run was only slow (one rank "
        "writing a large checkpoint while the others wait), raise train.collective_timeout_s"
    )
