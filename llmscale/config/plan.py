"""The resolved parallel plan: how a job's ranks and batch split, as `validate` settles them."""

from dataclasses import dataclass

from llmscale.config.schema import ActivationCheckpointing


@dataclass(frozen=True)
class ParallelPlan:
    world_size: int
    dp: int
    tp: int
    pp: int
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    ep: int = 1
    # Resolved: on only where it takes effect (tp > 1).
    sequence_parallel: bool = False
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    # The fast paths, resolved (train.compile, train.fused_loss, optim.fused).
    compile: bool = False
    fused_loss: bool = False
    fused_optimizer: bool = False

    def describe(self) -> str:
        extras = "".join((
            f", ep {self.ep}" if self.ep > 1 else "",
            ", sequence parallel" if self.sequence_parallel else "",
            f", {self.activation_checkpointing.value} activation checkpointing"
            if self.activation_checkpointing is not ActivationCheckpointing.none else "",
            ", compiled layers" if self.compile else "",
            ", fused loss" if self.fused_loss else "",
            ", fused AdamW" if self.fused_optimizer else "",
        ))
        return (
            f"world {self.world_size} = dp {self.dp} x tp {self.tp} x pp {self.pp}{extras}, "
            f"ZeRO-{self.zero_stage}, global batch {self.global_batch_size} = micro "
            f"{self.micro_batch_size} x accumulation {self.grad_accum_steps} x dp {self.dp}"
        )
