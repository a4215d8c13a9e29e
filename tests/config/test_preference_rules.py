"""objective=dpo's data and layouts: without data.pairs, with a folder that is missing, not
pairs or empty, and on the paths the loop does not run it on, refused with the field and the fix."""

import json

from llmscale.config import load_config, validate
from test_validate import config_error

DPO = ["objective=dpo", "data.paths=[]"]


def pairs_folder(tmp_path, kind="preference_pairs", documents=3):
    tmp_path.joinpath("dataset.json").write_text(json.dumps({"kind": kind,
                                                             "documents": documents}))
    return f"data.pairs={tmp_path}"


def test_dpo_on_a_prepared_pairs_folder_validates(tmp_path):
    plan = validate(load_config(["+exp=tiny", *DPO, pairs_folder(tmp_path)]), 2)
    assert not plan.fused_loss


def test_dpo_without_pairs_names_the_setting_and_how_to_prepare_them():
    message = config_error(DPO, 2)
    assert "objective=dpo trains on preference pairs and data.pairs is not set" in message
    assert "tools/prepare_sft.py --pairs" in message


def test_a_missing_a_foreign_or_an_empty_pairs_folder_is_named(tmp_path):
    assert f"data.pairs={tmp_path}/nowhere: there is no folder {tmp_path}/nowhere" in (
        config_error([*DPO, f"data.pairs={tmp_path}/nowhere"], 2))
    assert "is not a prepared pairs folder (no readable dataset.json)" in config_error(
        [*DPO, f"data.pairs={tmp_path}"], 2)
    assert "holds chat_examples, not preference pairs" in config_error(
        [*DPO, pairs_folder(tmp_path, kind="chat_examples")], 2)
    assert f"{tmp_path} holds no pairs" in config_error(
        [*DPO, pairs_folder(tmp_path, documents=0)], 2)


def test_pairs_are_refused_for_other_objectives_and_beside_other_data(tmp_path):
    folder = pairs_folder(tmp_path)
    assert "holds preference pairs, which objective=dpo trains, not objective=causal" in (
        config_error([folder], 2))
    assert "data.paths is set with objective=dpo" in config_error(
        ["objective=dpo", folder], 2)


def test_the_paths_dpo_does_not_run_on_are_refused(tmp_path):
    message = config_error([*DPO, pairs_folder(tmp_path), "train.fused_loss=true",
                            "model.num_experts=2"], 2)
    for named in ("objective=dpo with train.fused_loss=true",
                  "objective=dpo with model.num_experts=2"):
        assert named in message, message
    assert "objective=dpo with parallel" not in message, message


def test_dpo_validates_with_tensor_and_pipeline_parallelism(tmp_path):
    """Pipeline stages with or without LoRA (QLoRA's refusal of stages is the adapter's)."""
    folder = pairs_folder(tmp_path)
    validate(load_config(["+exp=tiny", *DPO, folder, "parallel.tp=2"]), 2)
    for adapter in ("adapter=none", "adapter=lora"):
        plan = validate(load_config(["+exp=tiny", *DPO, folder, "parallel.pp=2",
                                     "model.tie_embeddings=false", adapter]), 2)
        assert plan.pp == 2
