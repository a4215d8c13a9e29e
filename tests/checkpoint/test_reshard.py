"""The tensor-parallel merge rules saved with a checkpoint: adapters follow their projections'
split, and only rules that name a trained parameter are saved (DeepSpeed refuses the others)."""

from deepspeed.checkpoint.constants import (
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS,
)

from llmscale.checkpoint.reshard import universal_info

LAYER = "model.layers.0."


def test_a_lora_run_names_the_rules_of_its_adapters_only():
    info = universal_info([LAYER + "self_attn.q_proj.lora_A.weight",
                           LAYER + "self_attn.q_proj.lora_B.weight"])
    assert info[TP_REPLICATED_PARAMETER_PATTERNS] == [r".*(q_proj|k_proj|v_proj|gate_proj|"
                                                      r"up_proj)\.lora_A\.weight$"]
    assert info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] == []
    full = universal_info([LAYER + "input_layernorm.weight", LAYER + "mlp.down_proj.weight"])
    assert len(full[TP_REPLICATED_PARAMETER_PATTERNS]) == 1
    assert len(full[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS]) == 1

