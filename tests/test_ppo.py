"""The ways PPO for language models goes wrong, each pinned by a test."""
import pytest
import torch

from model import GPT, GPTConfig, last_token_scores
from ppo import (compute_gae, masked_whiten, pack_rollouts, policy_logprobs, ppo_policy_loss, ppo_value_loss,
                 sequence_score, shaped_rewards)


def naive_gae(rewards, values, gamma, lam):
    """One response, in plain Python, straight from the definition: the value after the end is 0."""
    T, adv = len(rewards), [0.0] * len(rewards)
    for t in range(T):
        total = 0.0
        for l in range(t, T):
            next_v = values[l + 1] if l + 1 < T else 0.0
            total += (gamma * lam) ** (l - t) * (rewards[l] + gamma * next_v - values[l])
        adv[t] = total
    return adv


def random_mask(B, T, g):
    """Each row: a prompt (masked out), a response of 1..n tokens, then padding."""
    mask = torch.zeros(B, T)
    for i in range(B):
        start = int(torch.randint(0, T - 1, (1,), generator=g))
        length = 1 if i == 0 else int(torch.randint(1, T - start + 1, (1,), generator=g))  # row 0: one token
        mask[i, start:start + length] = 1
    return mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_the_definition_and_ignores_everything_outside_the_response(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    B, T = 6, 12
    rewards, values, mask = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), random_mask(B, T, g)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for i in range(B):
        idx = mask[i].nonzero().squeeze(1).tolist()
        expected = naive_gae([rewards[i, t].item() for t in idx], [values[i, t].item() for t in idx], gamma, lam)
        torch.testing.assert_close(adv[i, idx], torch.tensor(expected), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[i, idx], adv[i, idx] + values[i, idx])
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    garbage = torch.where(mask.bool(), rewards, torch.randn(B, T) * 100), torch.where(mask.bool(), values, torch.randn(B, T) * 100)
    adv2, ret2 = compute_gae(*garbage, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_whitening_statistics_come_from_response_tokens_only():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -50.0, 0.0, 0.0]]), torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    w = masked_whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (kept - kept.mean()) / kept.var(unbiased=False).sqrt()
    torch.testing.assert_close(w[mask.bool()], expected, rtol=1e-5, atol=1e-5)
    assert (w[mask == 0] == 0).all()


def test_clipped_policy_loss_and_gradient_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3)
    loss, clip_frac = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # per token: -min(r A, clip(r) A): -min(1.5, 1.2) = -1.2 (clipped), -min(0.5, 0.8) = -0.5, -min(-2.2, -2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clip_frac.item() == pytest.approx(1 / 3)
    loss.backward()
    # clipped tokens get no gradient; elsewhere d(-r A)/d(log r) = -r A, over 3 tokens
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.5 / 3, 2.2 / 3]]))


def test_the_policy_loss_is_a_mean_over_the_batchs_actions():
    # responses of 3 actions and of 1, ratio 1: each action weighs 1/4 (PPO's and, as ppo.py says, GRPO's choice);
    # per response and then over responses (Shao et al.'s eq. 3) would give (-1 + 1) / 2 = 0
    adv, mask = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), adv, mask, clip=0.2)[0].item() == (-3 + 1) / 4


def test_clipped_value_loss_and_gradient_by_hand():
    old, ret, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    values = torch.tensor([[0.5, -0.1]], requires_grad=True)
    loss = ppo_value_loss(values, old, ret, mask, clip=0.2)
    # token 1: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped, no gradient); token 2: max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5 * 2 * (-0.1 + 1.0) / 2]]))


def test_losses_ignore_padding():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(4, 8, g)
    a, b, c = (torch.randn(4, 8, generator=g) for _ in range(3))
    noisy = [torch.where(mask.bool(), t, torch.randn(4, 8) * 50) for t in (a, b, c)]
    assert ppo_policy_loss(a, b, c, mask, 0.2)[0] == ppo_policy_loss(*noisy, mask, 0.2)[0]
    assert ppo_value_loss(a, b, c, mask, 0.2) == ppo_value_loss(*noisy, mask, 0.2)


def test_kl_is_zero_against_itself_and_the_score_lands_on_the_last_response_token():
    mask = torch.tensor([[0.0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    logprobs = torch.randn(2, 5)
    rewards, log_ratio = shaped_rewards(torch.tensor([2.0, -1.0]), logprobs, logprobs.clone(), mask, beta=0.1)
    assert (log_ratio == 0).all()
    assert rewards.tolist() == [[0, 0, 0, 2.0, 0], [0, 0, -1.0, 0, 0]]
    rewards, log_ratio = shaped_rewards(torch.zeros(2), logprobs, logprobs - 1.0, mask, beta=0.1)
    assert torch.allclose(log_ratio, mask) and torch.allclose(rewards, -0.1 * mask)  # response tokens only


def test_a_missing_end_token_is_penalized():
    score = sequence_score(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
                           torch.tensor([1.0, 0.0]), "rm", 1.0, rule_coef=1.0, missing_end_penalty=2.0)
    assert score.tolist() == [0.5, -1.5]
    score = sequence_score(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([[0.25, 0.5]]), torch.tensor([1.0]),
                           "rm", 1.0, 2.0, 1.0)
    assert score.tolist() == [0.5 - 2.0 * 0.75]


def test_the_reward_sources():
    rm, passed, rules, ended = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.0]), torch.zeros(2, 2), torch.ones(2)
    assert sequence_score(rm, passed, rules, ended, "tests", 2.0, 1.0, 1.0).tolist() == [1.0, 0.0]
    assert sequence_score(rm, passed, rules, ended, "both", 2.0, 1.0, 1.0).tolist() == pytest.approx([2.3, -0.2])


def test_the_reward_model_reads_the_last_token_of_prompt_plus_response():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_scores=1,
                        zero_init=False)).eval()
    torch.nn.init.normal_(model.score_head.weight)
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    with torch.no_grad():
        got = last_token_scores(model, seqs, 0)
        for i, s in enumerate(seqs):
            assert got[i, 0].item() == pytest.approx(model(torch.tensor([s]))[0][0, -1, 0].item(), abs=1e-5)


def test_rollout_layout_logprobs_match_sampling_at_the_same_temperature():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, zero_init=False)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    tokens, sampled_lp, lengths, _ = model.generate(prompts, 6, temperature=0.7, generator=torch.Generator().manual_seed(1))
    responses = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
    x, targets, mask = pack_rollouts(prompts, responses, 0, torch.device("cpu"))
    with torch.no_grad():
        lp, _ = policy_logprobs(model, x, targets, mask, 0.7)
    for i, p in enumerate(prompts):  # the update scores exactly what the rollout sampled
        torch.testing.assert_close(lp[i][mask[i].bool()], sampled_lp[i, :lengths[i]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lp, policy_logprobs(model, x, targets, mask, 1.0)[0])  # the temperature matters
    with torch.enable_grad():  # and the forward with autograd on gives the very same numbers
        assert torch.equal(policy_logprobs(model, x, targets, mask, 0.7)[0].detach(), lp)
