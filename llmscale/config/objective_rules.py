"""The rules of the `objective` and `dpo` settings, for `validate` (the data and layouts of
objective=dpo: `preference_rules`)."""

from typing import List

from llmscale.config.preference_rules import preference_rules
from llmscale.config.schema import DPOLoss, LLMScaleConfig, Objective


def objective_rules(cfg: LLMScaleConfig) -> List[str]:
    if cfg.objective is Objective.mlm:
        return masked_lm_rules(cfg)
    errors = []
    if not cfg.model.causal:
        errors.append(
            f"model.causal=false (bidirectional attention) with objective={cfg.objective.value}: "
            "predicting the next token while seeing it teaches nothing; set model.causal=true, "
            "or objective=mlm to train an encoder"
        )
    if cfg.objective is Objective.dpo:
        errors += dpo_rules(cfg)
    return errors + preference_rules(cfg)


def masked_lm_rules(cfg: LLMScaleConfig) -> List[str]:
    errors = []
    if cfg.model.causal:
        errors.append("objective=mlm trains a bidirectional encoder: set model.causal=false")
    if cfg.data.document_attention:
        errors.append("data.document_attention=true keeps packed documents apart with causal "
                      "attention; objective=mlm needs bidirectional attention: set it to false")
    if not 0.0 < cfg.mlm.rate < 1.0:
        errors.append(f"mlm.rate={cfg.mlm.rate} must lie in (0, 1) (BERT's is 0.15)")
    return errors


def dpo_rules(cfg: LLMScaleConfig) -> List[str]:
    dpo, errors = cfg.dpo, []
    if dpo.beta <= 0:
        errors.append(f"dpo.beta={dpo.beta} must be positive (0.1 is usual for DPO, 2 for simpo)")
    if not 0.0 <= dpo.label_smoothing < 0.5:
        errors.append(f"dpo.label_smoothing={dpo.label_smoothing} must lie in [0, 0.5): it is "
                      "the share of pairs assumed mislabelled, and 0.5 would make the loss flat")
    elif dpo.label_smoothing and dpo.loss in (DPOLoss.ipo, DPOLoss.hinge):
        errors.append(f"dpo.label_smoothing={dpo.label_smoothing} applies to dpo.loss=sigmoid "
                      f"or simpo, not dpo.loss={dpo.loss.value}: set it to 0")
    if dpo.simpo_gamma < 0:
        errors.append(f"dpo.simpo_gamma={dpo.simpo_gamma} must be >= 0 (0.5 to 1.5 are usual)")
    return errors
