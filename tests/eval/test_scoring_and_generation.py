"""Continuation log-likelihoods and KV-cache generation against direct computations on the full
logits of a tiny random model."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llmscale.config.schema import ModelConfig
from llmscale.eval.generate import greedy_generate
from llmscale.eval.scoring import continuation_logprobs
from llmscale.models import Llama

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=96, vocab_size=257, max_seq_len=48, init_std=0.1)


def random_llama(cfg: ModelConfig = TINY, seed: int = 0) -> Llama:
    """Large init so the greedy choices are not all one token."""
    torch.manual_seed(seed)
    return Llama(cfg).eval()


def ids(count: int, seed: int) -> list:
    return torch.randint(0, 257, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_scores_equal_the_log_softmax_of_the_whole_sequence():
    model = random_llama()
    requests = [(ids(7, 1), ids(3, 2)), (ids(20, 3), ids(1, 4)), (ids(2, 5), ids(9, 6))]
    scores = continuation_logprobs(model, requests)
    for (context, continuation), got in zip(requests, scores):
        sequence = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = F.log_softmax(model(sequence)[0].float(), dim=-1)
        expected = torch.stack([logprobs[len(context) - 1 + i, token]
                                for i, token in enumerate(continuation)])
        assert got.shape == (len(continuation),)
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_long_context_loses_its_oldest_tokens():
    model = random_llama()
    context, continuation = ids(60, 7), ids(4, 8)
    kept = (context + continuation)[-(TINY.max_seq_len + 1):]
    long, = continuation_logprobs(model, [(context, continuation)])
    cut, = continuation_logprobs(model, [(kept[:-4], continuation)])
    assert torch.allclose(long, cut, atol=1e-6)


def greedy_without_cache(model: Llama, prompt: list, max_new_tokens: int, stop_ids=()) -> list:
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([sequence]))[0, -1].argmax())
        if token in stop_ids:
            break
        sequence.append(token)
    return sequence[len(prompt):]


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, num_kv_heads=4, tie_embeddings=True)],
                         ids=["gqa", "mha-tied"])
def test_kv_cache_generation_equals_regenerating_the_whole_sequence(cfg):
    model = random_llama(cfg)
    generated = set()
    for seed in range(3):
        prompt = ids(5 + seed, seed)
        cached = greedy_generate(model, prompt, max_new_tokens=20)
        assert cached == greedy_without_cache(model, prompt, 20)
        generated.update(cached)
    assert len(generated) > 1  # real choices, not one token repeated


def test_generation_stops_at_a_stop_id_and_at_the_window():
    model = random_llama()
    prompt = ids(6, 11)
    free = greedy_generate(model, prompt, max_new_tokens=10)
    stop = free[4]
    assert greedy_generate(model, prompt, 10, stop_ids={stop}) == free[:free.index(stop)]
    long = ids(60, 12)  # prompt and answer must fit the window: the prompt's head is cut
    assert greedy_generate(model, long, 10) == greedy_generate(model, long[-38:], 10)
