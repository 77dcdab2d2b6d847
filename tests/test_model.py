import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache, attention, induction_test, offset_keys, rotate, sample_next_token
from muon import Muon, orthogonalize


def tiny(**overrides):
    torch.manual_seed(0)
    config = dict(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16, attn="math",
                  zero_init=False)  # random blocks and head: every path through the model carries signal
    return GPT(GPTConfig(**{**config, **overrides})).eval()


@pytest.mark.parametrize("path", ["math", "sdpa"])
def test_future_tokens_never_change_earlier_logits(path):
    model = tiny(attn=path)
    idx = torch.randint(0, 61, (3, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 61, (3, 8))
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # and later logits do see them


@pytest.mark.parametrize("T_q,T_k", [(17, 17), (1, 17), (5, 17)])
def test_sdpa_matches_math_forward_and_backward(T_q, T_k):
    q = torch.randn(2, 3, T_q, 8, requires_grad=True)
    k = torch.randn(2, 3, T_k, 8, requires_grad=True)
    v = torch.randn(2, 3, T_k, 8, requires_grad=True)
    outs, grads = [], []
    for path in ("math", "sdpa"):
        out = attention(q, k, v, path)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g_math, g_sdpa in zip(*grads):
        torch.testing.assert_close(g_math, g_sdpa, rtol=1e-4, atol=1e-5)


def test_kv_cache_prefill_and_decode_match_full_pass():
    model = tiny(attn="sdpa")
    idx = torch.randint(0, 61, (2, 12))
    full = model(idx)[0]
    cache = KVCache(model.config.n_layer, 12)
    parts = [model(idx[:, :7], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def recompute_greedy(model, prompt, n, eos_id):
    """The slow reference: the whole sequence through the model at every step, no cache."""
    seq, lps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0][0, -1]
        tok = int(logits.argmax())
        lps.append(torch.log_softmax(logits, -1)[tok].item())
        seq.append(tok)
        if tok == eos_id:
            break
    return seq[len(prompt):], lps


@pytest.mark.parametrize("path", ["math", "sdpa"])
def test_cached_batched_generation_equals_recompute(path):
    model = tiny(attn=path)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2], [11]]  # different lengths: left padding and masks
    eos_id = 13
    tokens, logprobs, lengths, _ = model.generate(prompts, 10, temperature=0, eos_id=eos_id, pad_id=0)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_lps = recompute_greedy(model, prompt, 10, eos_id)
        n = int(lengths[i])
        assert tokens[i, :n].tolist() == ref_tokens
        torch.testing.assert_close(logprobs[i, :n], torch.tensor(ref_lps), rtol=1e-4, atol=1e-5)
        assert (tokens[i, n:] == 0).all() and (logprobs[i, n:] == 0).all()


def test_rows_that_end_early_leave_the_batch_and_the_others_go_on_as_alone():
    model = tiny(untied_head=True)  # tied, an untrained model greedily repeats its last token
    prompts = [[i % 7 + 1, (3 * i) % 11 + 1, i + 2][:1 + i % 3] for i in range(12)]
    free = model.generate(prompts, 10, temperature=0).tokens
    eos_id = int(torch.mode(free[:, :5].flatten()).values)  # a token many rows produce early: many end, at
    ended = [(row == eos_id).nonzero()[0, 0].item() for row in free if (row == eos_id).any()]  # varied steps
    assert len(set(ended)) >= 2 and min(ended) < 9
    tokens, _, lengths, _ = model.generate(prompts, 10, temperature=0, eos_id=eos_id, pad_id=0)
    for i, prompt in enumerate(prompts):  # the cache's rows move as others end; each row's answer is its own
        assert tokens[i, :int(lengths[i])].tolist() == recompute_greedy(model, prompt, 10, eos_id)[0]


def test_samples_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, 1.0, generator=g), minlength=5) / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), rtol=0, atol=0.015)  # 4 sd at p = 0.64
    assert counts[4] == 0


def test_generation_stops_at_the_end_token():
    model = tiny()
    prompts = [[1, 2], [4], [9, 9, 9]]
    free = model.generate(prompts, 8, temperature=0).tokens  # no end token: all 8 tokens
    eos_id = int(free[0, 2])  # declare the third token of the first response an end token
    tokens, logprobs, lengths, _ = model.generate(prompts, 8, temperature=0, eos_id=eos_id, pad_id=0)
    for i in range(len(prompts)):
        row = free[i].tolist()
        n = row.index(eos_id) + 1 if eos_id in row else 8
        assert lengths[i] == n and tokens[i, :n].tolist() == row[:n]
        assert (tokens[i, n:] == 0).all() and (logprobs[i, n:] == 0).all()


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    assert set(sample_next_token(logits, 1.0, top_k=2).tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...: p=0.8 needs the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample_next_token(logits, 1.0, top_p=0.8).tolist()) == {0, 1}
    assert sample_next_token(logits, 0).tolist() == [0] * 2000


def test_sampled_logprobs_are_the_policys_not_the_truncated_ones():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    tokens, logprobs, _, _ = model.generate([[1, 2, 3]], 5, temperature=0.7, top_k=3, generator=g)
    seq = torch.tensor([[1, 2, 3] + tokens[0].tolist()])
    logits = model(seq)[0][:, 2:-1].float() / 0.7  # log p(token) under the whole softmax at the temperature
    expected = torch.log_softmax(logits, dim=-1).gather(-1, seq[:, 3:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, rtol=1e-4, atol=1e-5)


def test_initial_loss_is_near_uniform():
    model = tiny(vocab_size=512, n_embd=32)
    idx, targets = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
    loss = model(idx, targets)[1].item()
    assert abs(loss - math.log(512)) < 0.1


def test_one_batch_overfits():
    model = tiny(attn="sdpa").train()
    idx = torch.randint(0, 61, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_ignored_targets_do_not_count():
    model = tiny()
    idx = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    masked = targets.clone()
    masked[:, :4] = -1
    other = masked.clone()
    logits = model(idx)[0]
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 61), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(model(idx, masked)[1], expected)
    other[:, :4] = -1  # same ignored positions, whatever the token was
    torch.testing.assert_close(model(idx, other)[1], expected)


def test_a_scored_model_returns_its_scores():
    model = tiny(n_scores=3)
    scores, loss = model(torch.randint(0, 61, (2, 9)))
    assert scores.shape == (2, 9, 3) and scores.dtype == torch.float32 and loss is None


@pytest.mark.parametrize("bad,match", [(dict(n_embd=30, n_head=4), "divisible"), (dict(attn="fast"), "attn"),
                                       (dict(n_layer=0), "positive"), (dict(rotary=False), "key_offset"),
                                       (dict(n_embd=24, n_head=4), "divisible by 4")])
def test_bad_configs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**bad)


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        tiny().generate([[1] * 30], 5)


def test_the_key_offset_hands_each_key_the_previous_positions_half():
    k = torch.randn(2, 3, 9, 8)
    first = (torch.arange(9) == 0)[None, None, :, None]
    shifted = offset_keys(k, first, None, 0)
    assert torch.equal(shifted[..., :4], k[..., :4])  # the rotated half stays where it is
    assert torch.equal(shifted[..., 1:, 4:], k[..., :-1, 4:]) and (shifted[..., 0, 4:] == 0).all()
    cache = KVCache(1, 9)  # in chunks through the cache: the same keys
    chunks = [offset_keys(k[:, :, :5], first[:, :, :5], cache, 0)]
    for t in range(5, 9):
        cache.pos = t  # as KVCache.update leaves it after each step
        chunks.append(offset_keys(k[:, :, t:t + 1], first[:, :, t:t + 1], cache, 0))
    assert torch.equal(torch.cat(chunks, dim=2), shifted)


def test_rotary_scores_depend_only_on_the_distance():
    q, k, freq = torch.randn(8), torch.randn(8), 10000.0 ** -torch.arange(0, 1, 0.5)
    def score(i, j):  # q at position i, k at position j
        rq, rk = (rotate(x, (p * freq).cos(), (p * freq).sin()) for x, p in ((q, i), (k, j)))
        return rq @ rk
    torch.testing.assert_close(score(3, 1), score(12, 10))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_the_gpt2_layout_is_every_modern_field_off():
    old = tiny(rotary=False, key_offset=False, qk_norm=False, relu2=False)
    assert old.transformer.wpe is not None and old.transformer.wte.weight is old.lm_head.weight
    assert not hasattr(tiny().transformer, "wpe")
    untied = tiny(untied_head=True)
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    assert untied.num_params() == tiny().num_params()  # the token table is a lookup: no FLOPs


def test_orthogonalize_sets_every_singular_value_near_one():
    for shape in ((3, 16, 16), (48, 16), (16, 48)):
        s = torch.linalg.svdvals(orthogonalize(torch.randn(*shape)))
        assert s.min() > 0.6 and s.max() < 1.25, shape  # Jordan et al.: about [0.7, 1.2], enough for an update


def test_muon_orthogonalizes_the_matrices_and_leaves_the_rest_to_the_textbook_adamw():
    a, b = tiny().train(), tiny().train()
    ours = a.configure_optimizers(1e-2, 0.1, (0.9, 0.95), "cpu", matrix_lr=0.02)
    assert isinstance(ours, Muon) and [g["muon"] for g in ours.param_groups] == [False, False, True, True]
    idx = torch.randint(0, 61, (2, 12))
    a(idx, idx)[1].backward()
    fc = a.transformer.h[0].mlp.c_fc.weight  # (4C, C): tall, so its step is scaled by sqrt(4)
    before, grad = fc.detach().clone(), fc.grad.clone()
    ours.step()
    torch.testing.assert_close(fc - before, -0.02 * 2 * orthogonalize(grad[None])[0], rtol=1e-3, atol=1e-5)
    a = tiny().train()
    ours = a.configure_optimizers(1e-2, 0.1, (0.9, 0.95), "cpu", matrix_lr=0.02)
    for g in ours.param_groups:  # the matrices held still, the other parameters step for step with torch's AdamW
        g["lr"] = 0.0 if g["muon"] else g["lr"]
    name_of, twin = {id(p): n for n, p in a.named_parameters()}, dict(b.named_parameters())
    reference = torch.optim.AdamW([dict(params=[twin[name_of[id(p)]] for p in g["params"]],
                                        weight_decay=g["weight_decay"]) for g in ours.param_groups if not g["muon"]],
                                  lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        for model, opt in ((a, ours), (b, reference)):
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
    for n, p in a.named_parameters():
        torch.testing.assert_close(p, twin[n], rtol=1e-4, atol=1e-6)


class Copier(torch.nn.Module):
    """A stand-in GPT whose logits pick the token `back` positions earlier (back=length: a perfect copier)."""

    def __init__(self, back):
        super().__init__()
        self.back, self.lm_head, self.config = back, torch.nn.Linear(1, 1), GPTConfig(block_size=100)

    def forward(self, idx):
        source = torch.roll(idx, self.back - 1, dims=1)  # position t predicts token t+1 = token t+1-back
        return torch.nn.functional.one_hot(source, 64).float(), None


def test_the_induction_test_scores_copying_and_only_copying():
    pool = torch.arange(64)
    assert induction_test(Copier(back=50), pool, length=50) == [1.0] * 4  # reads the token one repeat back
    assert max(induction_test(Copier(back=49), pool, length=50)) < 0.1  # one position off: chance
    assert max(induction_test(Copier(back=1), pool, length=50)) < 0.1  # repeats the current token
