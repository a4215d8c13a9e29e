"""A 1-rank gloo process group inside the test process, for code that needs torch.distributed
(DeepSpeed's MoE groups, megatron-core's parallel state) without launching ranks."""

import socket
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch.distributed as dist


@contextmanager
def one_rank_process_group() -> Iterator[None]:
    """Torn down afterwards, with the groups DeepSpeed and megatron-core cache, so later tests
    in this process start without one."""
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    from llmscale.parallel.distributed import init_distributed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            env.setenv(name, value)
        init_distributed()
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
            # DeepSpeed caches its expert groups by name; the handles die with the group.
            for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                          groups._EXPERT_DATA_PARALLEL_GROUP,
                          groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
                cache.clear()
