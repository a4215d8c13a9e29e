"""The process grid: megatron-core's `parallel_state` builds every group (tensor, pipeline, data
parallel), in the rank order Megatron users know: tensor-parallel ranks adjacent, then data,
then pipeline. DeepSpeed's pipeline topology orders ranks the same way, so its pipeline groups
and Megatron's coincide."""

from megatron.core import parallel_state

from llmscale.config.plan import ParallelPlan
from llmscale.parallel.megatron_cpu import allow_megatron_layers_on_cpu


def init_model_parallel(plan: ParallelPlan) -> int:
    """Needs torch.distributed initialised; idempotent. Returns this rank's data-parallel rank,
    which picks its share of each global batch."""
    allow_megatron_layers_on_cpu()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=plan.tp,
            pipeline_model_parallel_size=plan.pp,
            # The default group is gloo already on CPU; on GPU nothing here needs gloo groups.
            create_gloo_process_groups=False,
        )
    return parallel_state.get_data_parallel_rank()


class DeepSpeedGroups:
    """parallel_state under the names DeepSpeed asks its `mpu` for: its gradient all-reduce
    then runs over the data-parallel group only, and its gradient-norm clipping counts the
    weights replicated across tensor-parallel ranks once."""

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(
        parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(
        parallel_state.get_tensor_model_parallel_src_rank)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return parallel_state.get_model_parallel_group().rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return parallel_state.get_model_parallel_group().size()
