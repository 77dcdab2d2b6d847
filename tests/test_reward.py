import itertools
import math
import random
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, CheckpointError, last_token_scores, load_checkpoint, save_checkpoint, with_score_head
from reward import pair_accuracy, pairwise_loss
from judge import best_of_n

CPU = torch.device("cpu")



def test_pairwise_loss_and_gradient_by_hand():
    rewards = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
    loss = pairwise_loss(rewards, [0, 1, 2])  # pairs (0,1), (0,2), (1,2): margins 1, 2, 1
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -(math.log(sig(1)) + math.log(sig(2)) + math.log(sig(1))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dr_w -log sig(r_w - r_l) = -sig(r_l - r_w); the loser gets the opposite
    g0 = -(sig(-1) + sig(-2)) / 3
    g1 = (sig(-1) - sig(-1)) / 3
    g2 = (sig(-2) + sig(-1)) / 3
    torch.testing.assert_close(rewards.grad, torch.tensor([g0, g1, g2]))


def test_ranking_order_decides_who_wins():
    rewards = torch.tensor([0.0, 3.0])
    assert pairwise_loss(rewards, [1, 0]) < pairwise_loss(rewards, [0, 1])


def tiny_rm(seed=0, vocab=40):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, n_scores=1))


def test_k_choose_2_in_one_batch_equals_pair_by_pair():
    model = tiny_rm()
    torch.nn.init.normal_(model.score_head.weight)
    responses = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3]]
    ranking = [2, 0, 3, 1]
    r = last_token_scores(model, responses, 0)[:, 0]
    batched = pairwise_loss(r, ranking)
    separate = []
    for w, l in itertools.combinations(ranking, 2):  # each comparison as its own two-sequence batch
        pair = last_token_scores(model, [responses[w], responses[l]], 0)[:, 0]
        separate.append(-F.logsigmoid(pair[0] - pair[1]))
    torch.testing.assert_close(batched, torch.stack(separate).mean(), rtol=1e-5, atol=1e-6)


def test_a_reward_model_learns_a_synthetic_preference(preference_trainer):
    """Prefer responses that contain token 7: held-out pairwise accuracy must be high."""
    model = tiny_rm(vocab=40)

    def pair(rng):
        base = [rng.choice([t for t in range(1, 40) if t != 7]) for _ in range(6)]
        good = list(base)
        good[rng.randrange(6)] = 7
        return good, base

    preference_trainer(model, pair, 120)
    rng = random.Random(1)
    with torch.no_grad():
        held_out = [pair(rng) for _ in range(100)]
        r = last_token_scores(model, [s for p in held_out for s in p], 0)[:, 0]
    accuracy = (r[0::2] > r[1::2]).float().mean().item()
    assert accuracy > 0.9


def test_with_score_head_keeps_the_trunk_and_starts_at_zero(tmp_path):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    ckpt = dict(model_args=asdict(policy.config), model=policy.state_dict())
    rm = with_score_head(ckpt, 3, CPU)
    assert torch.equal(rm.transformer.h[0].attn.c_attn.weight, policy.transformer.h[0].attn.c_attn.weight)
    assert (rm(torch.tensor([[1, 2, 3]]))[0] == 0).all()


def test_pair_accuracy_skips_ties_and_compares_both_orders():
    records = [dict(utilities=[1.0, 0.5, 0.5], ranking=[1, 0, 2], texts=["a", "b", "c"])]
    scores = [[2.0, 1.0, 0.0]]
    # non-tied pairs: (0,1) and (0,2); gold: 0 beats both, the scores agree on both
    assert pair_accuracy(scores, records, "utilities") == 1.0
    # the labeler put 1 above 0 (disagreeing with the scores) and 0 above 2 (agreeing)
    assert pair_accuracy(scores, records, "ranking") == 0.5


def test_best_of_n_filters_flagged_samples_then_takes_the_top_score():
    scores = [[0.1, 0.9, 0.5, 0.7]]
    rule_probs = [[[0.0], [0.8], [0.1], [0.2]]]  # sample 1 has the top score but is flagged
    assert best_of_n(scores, rule_probs, 4) == [3]
    assert best_of_n(scores, rule_probs, 2) == [0]
    assert best_of_n([[0.3, 0.6]], [[[0.9], [0.9]]], 2) == [1]  # all flagged: fall back to the score


def test_a_policy_is_not_a_reward_model_and_back(tmp_path):
    import tiktoken
    enc = tiktoken.Encoding(name="t", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    save_checkpoint(tmp_path / "sft.pt", tiny_rm(), "sft", enc)
    save_checkpoint(tmp_path / "reward.pt", tiny_rm(), "reward", enc)
    with pytest.raises(CheckpointError, match="'sft' checkpoint; this needs one of \\('reward',\\)"):
        load_checkpoint(tmp_path / "sft.pt", ["reward"])
    with pytest.raises(CheckpointError, match="'reward' checkpoint; this needs one of \\('sft',\\)"):
        load_checkpoint(tmp_path / "reward.pt", ["sft"])
