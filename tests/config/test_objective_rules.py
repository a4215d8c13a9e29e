"""The `objective`, `dpo` and `mlm` settings: bad values are named with the fix."""

from llmscale.config import load_config, validate
from test_validate import BASE, config_error


def test_the_default_objective_is_causal_and_validates():
    cfg = load_config(BASE)
    validate(cfg, 2)
    assert cfg.objective.value == "causal" and cfg.dpo.loss.value == "sigmoid"


def test_every_bad_dpo_value_is_named_in_one_error():
    message = config_error(["objective=dpo", "dpo.beta=0", "dpo.label_smoothing=0.5",
                            "dpo.simpo_gamma=-1"], 2)
    for named in ("dpo.beta=0.0",
                  "dpo.label_smoothing=0.5 must lie in [0, 0.5)", "dpo.simpo_gamma=-1.0"):
        assert named in message, message


def test_label_smoothing_is_refused_for_losses_without_it():
    assert "applies to dpo.loss=sigmoid or simpo, not dpo.loss=ipo" in config_error(
        ["objective=dpo", "dpo.loss=ipo", "dpo.label_smoothing=0.1"], 2)
    assert "dpo.label_smoothing" not in config_error(
        ["objective=dpo", "dpo.loss=simpo", "dpo.label_smoothing=0.1"], 2)


def test_masked_lm_needs_a_bidirectional_model_without_document_attention():
    validate(load_config(BASE + ["objective=mlm", "model.causal=false"]), 2)
    message = config_error(["objective=mlm", "data.document_attention=true", "mlm.rate=1.5"], 2)
    for named in ("objective=mlm trains a bidirectional encoder: set model.causal=false",
                  "data.document_attention=true", "mlm.rate=1.5 must lie in (0, 1)"):
        assert named in message, message


def test_a_bidirectional_model_is_refused_for_next_token_prediction():
    assert "model.causal=false (bidirectional attention) with objective=causal" in config_error(
        ["model.causal=false"], 2)


def test_dpo_settings_are_ignored_for_the_causal_objective():
    validate(load_config(BASE + ["dpo.beta=0", "dpo.label_smoothing=0.7"]), 2)
