"""Generation with the KV cache against recomputation, batching, sampling and TP=2."""
import copy

import pytest
import torch

from megallama.inference import SamplingParams, generate, prepare_for_inference, sample_next_token
from megallama.inference.generation import fit_new_tokens
from megallama.kv_cache import KVCache
from tests.distributed_utils import run_distributed
from tests.inference.conftest import seeded_model, tiny_config

PROMPTS = [[1, 17, 93, 4, 250, 8, 61], [1, 5], [1, 300, 22, 22, 9]]


@pytest.fixture(scope="module")
def model():
    return seeded_model(tiny_config())


def test_cache_and_recomputation_give_the_same_tokens(model):
    cached = generate(model, PROMPTS, 16)
    recomputed = generate(model, PROMPTS, 16, use_cache=False)
    assert cached == recomputed
    assert all(len(row) == 16 for row in cached)
    assert len({tuple(row) for row in cached}) == len(PROMPTS)  # the model does depend on the prompt
    params = SamplingParams(greedy=False, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    assert generate(model, PROMPTS, 8, params) == generate(model, PROMPTS, 8, params, use_cache=False)


def test_cached_logits_equal_the_full_forward(model):
    ids = torch.tensor([PROMPTS[0] + [7, 7, 3, 120]])
    reference = model(ids)[0]
    cache = KVCache(model, 1, ids.shape[1])
    with torch.no_grad():
        prefill = model(ids[:, :5], cache=cache)
        torch.testing.assert_close(prefill[0], reference[:5], rtol=1e-5, atol=1e-5)
        chunk = model(ids[:, 5:7], cache=cache, logits_to_keep=1)  # several new positions after cached ones
        assert chunk.shape == (1, 1, model.config.vocab_size) and cache.length == 7
        torch.testing.assert_close(chunk[0, -1], reference[6], rtol=1e-5, atol=1e-5)
        for position in range(7, ids.shape[1]):
            step = model(ids[:, position:position + 1], cache=cache)
            torch.testing.assert_close(step[0, -1], reference[position], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no_grad"):
        model(ids[:, :1], cache=KVCache(model, 1, 4))
    with torch.no_grad(), pytest.raises(ValueError, match="cache holds"):
        model(ids[:, :1], cache=cache)


def test_cached_forward_of_a_left_padded_batch_equals_each_row_alone(model):
    rows = [[1, 17, 93, 4, 250], [1, 5], [1, 300, 22]]
    steps = [[8, 61], [44, 2], [9, 9]]
    longest, total = max(map(len, rows)), max(map(len, rows)) + 2
    padded = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    key_padding = torch.ones(len(rows), total, dtype=torch.bool)
    for i, r in enumerate(rows):
        key_padding[i, :longest - len(r)] = False
    cache = KVCache(model, len(rows), total, key_padding)
    with torch.no_grad():
        logits = [model(padded, cache=cache, logits_to_keep=1)[:, -1]]
        for step in range(2):
            logits.append(model(torch.tensor([[s[step]] for s in steps]), cache=cache)[:, -1])
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r + steps[i]]))[0]
        for k, row_logits in enumerate(logits):
            torch.testing.assert_close(row_logits[i], alone[len(r) - 1 + k], rtol=1e-5, atol=1e-5)


def test_a_padded_batch_equals_each_prompt_alone(model):
    batched = generate(model, PROMPTS, 12)
    assert batched == [generate(model, [p], 12)[0] for p in PROMPTS]


def test_generation_stops_at_eos(model):
    free = generate(model, PROMPTS, 12)
    eos = free[0][5]
    stopped = generate(model, PROMPTS, 12, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos)]
    for free_row, row in zip(free, stopped):
        assert row == (free_row[:free_row.index(eos)] if eos in free_row else free_row)


def test_sampling_restrictions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, SamplingParams()), greedy)
    assert torch.equal(sample_next_token(logits, SamplingParams(greedy=False, top_k=1), g), greedy)
    assert torch.equal(sample_next_token(logits, SamplingParams(greedy=False, top_p=1e-6), g), greedy)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        drawn = sample_next_token(logits, SamplingParams(greedy=False, top_k=3, temperature=5.0), g)
        assert (top3 == drawn[:, None]).any(-1).all()
    # top_p keeps the smallest set whose probability reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seen = {int(sample_next_token(probs, SamplingParams(greedy=False, top_p=0.75), g)) for _ in range(200)}
    assert seen == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(greedy=False, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(greedy=False, temperature=-0.5)


def test_temperature_zero_is_greedy_decoding(model):
    """As in Meta's reference generate and vLLM (it was refused: "temperature must be > 0")."""
    zero = SamplingParams(greedy=False, temperature=0.0, top_k=3, top_p=0.5, seed=1)
    assert zero.greedy
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, zero), logits.argmax(-1))
    assert generate(model, PROMPTS, 8, zero) == generate(model, PROMPTS, 8)


def test_unseeded_sampling_follows_torch_manual_seed(model):
    """seed=None draws from torch's default generator (lm-eval seeds it), leaving it seeded."""
    params = SamplingParams(greedy=False, temperature=2.0)
    torch.manual_seed(5)
    first, after_first = generate(model, PROMPTS, 8, params), torch.rand(1)
    torch.manual_seed(5)
    assert generate(model, PROMPTS, 8, params) == first and torch.equal(torch.rand(1), after_first)


def test_padding_rows_of_the_vocabulary_are_never_chosen(sp_model):
    from megallama.inference.text import generate_text
    from megallama.tokenizer import SentencePieceTokenizer

    padded = seeded_model(tiny_config(vocab_size=384))  # 320 pieces padded to a multiple of 128
    sampling = SamplingParams(greedy=False, temperature=2.0, seed=0)
    assert any(t >= 320 for row in generate(padded, PROMPTS, 16, sampling) for t in row)  # they would be
    for params in (None, sampling):
        assert all(t < 320 for row in generate(padded, PROMPTS, 16, params, vocab_size=320) for t in row)
    # the text path passes the tokenizer's size (decoding a padding id raised IndexError)
    assert len(generate_text(padded, SentencePieceTokenizer(sp_model), ["the cat"], 16, sampling)) == 1


def test_too_long_generation_is_refused(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, PROMPTS, model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)


def test_new_tokens_are_shortened_to_fit_the_positions(model):
    """Meta's reference: total_len = min(max_seq_len, max_gen_len + max_prompt_len)."""
    positions = model.config.max_position_embeddings
    assert fit_new_tokens(positions, 7, 128) == positions - 7
    assert fit_new_tokens(positions, 7, 10) == 10
    assert fit_new_tokens(positions, positions - 1, 128) == 1
    long_prompt = [1] + [17] * 89
    rows = generate(model, [long_prompt, [1, 5]], fit_new_tokens(positions, len(long_prompt), 128))
    assert [len(row) for row in rows] == [positions - 90] * 2  # the cache holds exactly the positions
    with pytest.raises(ValueError, match=f"a prompt of {positions} tokens leaves no room for a new token: the "
                                         f"model has max_position_embeddings={positions}"):
        fit_new_tokens(positions, positions, 1)


def _generate_under_tp(tp, prompts, new_tokens, sampling):
    from megallama import parallel

    parallel.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        config = tiny_config()
        model = seeded_model(config)
        assert model.layers["0"].attention.wqkv.weight.shape[0] == 3 * config.hidden_size // tp
        return [generate(model, prompts, new_tokens), generate(model, prompts, new_tokens, SamplingParams(**sampling)),
                generate(model, prompts, new_tokens, SamplingParams(greedy=False, temperature=0.0))]
    finally:
        parallel.destroy_model_parallel()


def test_tensor_parallel_generation_equals_serial(model):
    sampling = dict(greedy=False, temperature=0.9, top_k=40, seed=11)
    serial_greedy = generate(model, PROMPTS, 10)
    serial_sampled = generate(model, PROMPTS, 10, SamplingParams(**sampling))
    results = run_distributed(_generate_under_tp, 2, 2, PROMPTS, 10, sampling)
    assert results == [[serial_greedy, serial_sampled, serial_greedy]] * 2  # temperature 0: greedy, every rank


def test_inference_layout_keeps_values_and_tokens(model):
    prepared = prepare_for_inference(copy.deepcopy(model))
    head = prepared.output.weight
    assert not head.is_contiguous() and head.t().is_contiguous()
    assert torch.equal(head, model.output.weight)
    ids = torch.tensor([PROMPTS[0]])
    torch.testing.assert_close(prepared(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert generate(prepared, PROMPTS, 12) == generate(model, PROMPTS, 12)
    # a weight changed after preparing is used as it is now, not as it was packed
    with torch.no_grad():
        prepared.output.weight.mul_(-1.0)
    with torch.no_grad():
        cached = prepared(ids, cache=KVCache(prepared, 1, 8), logits_to_keep=1)
    torch.testing.assert_close(cached[0, -1], prepared(ids)[0, -1], rtol=1e-5, atol=1e-5)
