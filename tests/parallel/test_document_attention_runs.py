"""Document attention through the real launcher: pipeline parallel (later stages get the
positions from the first) learns what one process learns, on a corpus of many short documents."""

import pytest
from corpus_fixtures import english_paragraphs
from launching import launch, metrics

STEPS = 3
COMMON = ["data.document_attention=true", "model.tie_embeddings=false",
          f"train.max_steps={STEPS}", "train.eval_batches=1", "checkpoint.interval=0",
          "checkpoint.save_final=false"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Hamlet's speeches, one file (one document) each, 200 bytes on average: most 128-token
    samples hold a document boundary."""
    folder = tmp_path_factory.mktemp("speeches")
    for index, speech in enumerate(english_paragraphs(count=1000, min_chars=40)):
        (folder / f"{index:03d}.txt").write_text(speech)
    return str(folder)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("one-process")
    launch("python", run_dir, *COMMON, f"data.paths=[{corpus}]")
    return metrics(run_dir, "loss")


# tp=2 with sequence parallelism passes too (measured 41 s, beside 46 s for pp=2, under load);
# left out to keep the slow suite's time: its ranks see the whole input ids, as one process does.
@pytest.mark.parametrize("plan", [pytest.param(["parallel.pp=2"], id="pp2")])
def test_plan_with_document_attention_matches_one_process(plan, corpus, reference, tmp_path):
    launch("torchrun", tmp_path, *COMMON, f"data.paths=[{corpus}]", *plan)
    losses = metrics(tmp_path, "loss")
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    for step, expected in reference.items():
        assert abs(losses[step] - expected) / abs(expected) < 1e-5, (step, losses[step], expected)
