"""How the stages wire their pieces together, each pinned so that a plausible wrong version fails:
values read at the wrong position, the reward read before the end token, returns from whitened
advantages, no whitening, a ratio stuck at 1, ptx with the wrong sign, the adaptive KL controller
stepping the wrong way, the reward normalization's sign, reranking by the lowest log-probability or
counting forced tokens, ties counted as wins; group-relative advantages and the test reward (GRPO, RL
from tests); and what the loop computes from its rollouts: a cut response taken as ended, forced tool
tokens taken as actions, scoring at another temperature than sampling, gamma and lambda swapped,
GRPO's KL left out of its loss."""
import argparse
import random

import pytest
import torch

from model import GPT, Generation, GPTConfig, last_token_scores
from ppo import (adaptive_beta, compute_gae, gae_advantages, group_advantages, minibatch_losses, pack_rollouts,
                 policy_logprobs, reward_from_tests, rollout_advantages, rollout_batch, rollout_logprobs,
                 score_responses, token_values)
from reward import normalize_reward
from judge import rerank_by_logprob
from tasks import compare, make_tasks, win_rates

END = 49


def tiny(n_scores=0, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_scores=n_scores,
                          zero_init=False)).eval()  # random blocks and head: outputs that differ
    if n_scores:
        torch.nn.init.normal_(model.score_head.weight)
    return model


def test_the_value_of_a_state_is_read_where_its_action_is_chosen():
    value_model, x = tiny(n_scores=1), torch.randint(0, 49, (2, 12))
    values = token_values(value_model, x)
    for t in range(12):  # the state after token t sees tokens 0..t and nothing later
        torch.testing.assert_close(values[:, t], value_model(x[:, :t + 1])[0][:, -1, 0])


def test_the_reward_models_read_the_end_token():
    reward_model, rule_model = tiny(n_scores=1, seed=1), tiny(n_scores=2, seed=2)
    prompts, responses = [[1, 2, 3], [4, 5]], [[7, 8, END], [9, END]]
    rm, rules = score_responses(reward_model, rule_model, [p + r for p, r in zip(prompts, responses)], 0)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full = torch.tensor([p + r])
        assert full[0, -1] == END
        assert rm[i].item() == pytest.approx(reward_model(full)[0][0, -1, 0].item(), abs=1e-5)
        torch.testing.assert_close(rules[i], torch.sigmoid(rule_model(full)[0][0, -1]))


def test_returns_come_from_raw_advantages_and_advantages_are_whitened():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    mask = torch.zeros(4, 10)
    mask[:, 3:8] = 1
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 0.95)
    raw, raw_returns = compute_gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(returns, raw_returns)
    torch.testing.assert_close(returns, (raw + values) * mask)
    on = advantages[mask.bool()]
    assert abs(on.mean().item()) < 1e-5 and abs(on.std(unbiased=False).item() - 1) < 1e-3
    assert not torch.allclose(advantages, raw)


def minibatch(policy, prompts=((1, 2, 3), (4, 5, 6, 7)), responses=((8, 9, END), (10, END))):
    x, targets, mask = pack_rollouts([list(p) for p in prompts], [list(r) for r in responses], 0, torch.device("cpu"))
    with torch.no_grad():
        logprobs = policy_logprobs(policy, x, targets, mask, 1.0)[0]
    return dict(x=x, targets=targets, mask=mask, old_logprobs=logprobs, ref_logprobs=logprobs,
                advantages=torch.ones_like(mask) * mask, old_values=torch.zeros_like(mask), returns=torch.zeros_like(mask))


def test_the_ratio_moves_and_the_clip_bites():
    policy = tiny()
    mb = minibatch(policy)
    _, _, stats = minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2)
    assert stats["ratio_dev"] == 0 and stats["clip_frac"] == 0  # the first minibatch: ratio exactly 1
    mb["old_logprobs"] = mb["old_logprobs"] - mb["mask"]  # the policy now makes every action e times likelier
    loss, _, stats = minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2)
    assert stats["clip_frac"] == 1.0 and stats["ratio_dev"] == pytest.approx(torch.e - 1, rel=1e-4)
    loss.backward()  # clipped everywhere with a positive advantage: no gradient to push further
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in policy.parameters())


def test_ptx_adds_the_pretraining_loss_to_the_policy_loss():
    policy = tiny()
    mb = minibatch(policy)
    ptx = (torch.randint(0, 49, (2, 8)), torch.randint(0, 49, (2, 8)))
    without, _, _ = minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2)
    with_ptx, _, stats = minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2, ptx=ptx, ptx_coef=0.5)
    lm_loss = policy(*ptx)[1].item()
    assert stats["ptx_loss"] == pytest.approx(lm_loss) and lm_loss > 0
    assert with_ptx.item() == pytest.approx(without.item() + 0.5 * lm_loss, rel=1e-5)


def test_grpo_puts_the_kl_to_the_reference_in_the_loss():
    policy = tiny()
    mb = minibatch(policy)
    base, _, _ = minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2, kl_coef=0.1)
    assert base.item() == pytest.approx(minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2)[0].item())  # KL 0 at start
    mb["ref_logprobs"] = mb["ref_logprobs"] - mb["mask"]
    further, _, _ = minibatch_losses(policy, None, mb, 1.0, 0.2, 0.2, kl_coef=0.1)
    assert further.item() == pytest.approx(base.item() + 0.1 * (torch.e ** -1 - 1 + 1), rel=1e-4)  # k3 of log-ratio 1


def test_the_adaptive_kl_controller_follows_ziegler():
    assert adaptive_beta(0.1, 2.0, 1.0, 64, 640) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # above target: up, clipped
    assert adaptive_beta(0.1, 0.9, 1.0, 64, 640) == pytest.approx(0.1 * (1 - 0.1 * 0.1))  # below: down
    assert adaptive_beta(0.1, 1.0, 1.0, 64, 640) == 0.1


def test_reward_normalization_makes_the_reference_answers_score_zero():
    reward_model = tiny(n_scores=1)
    demos = [[1, 2, 3, END], [4, 5, END], [6, 7, 8, 9, END]]
    offset = normalize_reward(reward_model, demos, 0, torch.autocast("cpu", enabled=False))
    scores = last_token_scores(reward_model, demos, 0)[:, 0]
    assert abs(scores.mean().item()) < 1e-5 and offset != 0


def test_reranking_picks_the_highest_mean_logprob_of_each_prompt_over_the_tokens_it_chose():
    samples = [dict(logprobs=lp, forced=[False] * len(lp)) for lp in
               ([-1.0, -1.0], [-0.1, -0.3], [-2.0], [-0.5, -0.5, -0.5], [-0.4], [-3.0, 0.0])]
    # a tool's result forced into an answer has log-probability 0: counted, it would make the first of these win
    samples += [dict(logprobs=[-1.0, 0.0, 0.0, 0.0, -2.0], forced=[False, True, True, True, False]),
                dict(logprobs=[-1.2, -1.2], forced=[False, False]), dict(logprobs=[-1.4], forced=[False])]
    assert rerank_by_logprob(samples, 3) == [1, 4, 7]


def test_ties_count_half_for_the_noiseless_judge_and_labelers_flip_coins():
    rng = random.Random(0)
    assert compare(0.5, 0.5, rng)[1] == 0.5 and compare(0.6, 0.5, rng)[1] == 1.0 and compare(0.4, 0.5, rng)[1] == 0.0
    labeler, noiseless = win_rates([0.5] * 400, [0.5] * 100, 4, 1, rng)
    assert noiseless == [0.5] * 400 and 0.4 < sum(labeler) / 400 < 0.6


def test_group_relative_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4; the second all equal
    mask = torch.ones(8, 3)
    mask[0, 2] = 0
    advantages = group_advantages(scores, 4, mask)
    expected = 0.5 / (torch.tensor([1.0, 0.0, 0.0, 1.0]).std() + 1e-6)  # (1 - 0.5) / std, unbiased std
    torch.testing.assert_close(advantages[:4, 0], torch.stack([expected, -expected, -expected, expected]))
    assert advantages[0, 2] == 0 and torch.equal(advantages[4:], torch.zeros(4, 3))
    assert torch.isfinite(advantages).all()


def test_the_tests_reward_right_wrong_erroring_and_looping_answers():
    task = make_tasks("train", 1, seed=3)[0]
    answers = [task.reference, task.reference.replace("return ", "return 1 + ", 1) if task.arg_type == "int" else
               task.reference.replace("return ", "return None and ", 1), "def f(:\n", f"def {task.func_name}(x):\n"
               f"    while True:\n        pass\n"]
    passed, evals = reward_from_tests([task] * 4, answers, timeout=0.5)
    assert passed.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert [e["result"] for e in evals][2:] == ["error", "timeout"]


def test_a_cut_response_has_not_ended_and_forced_tool_tokens_are_not_actions():
    # as model.generate returns them: a response that ended, one cut at max_new_tokens, one with a forced tool result
    gen = Generation(tokens=torch.tensor([[8, END, 0, 0], [8, 9, 10, 11], [8, 30, 31, END]]),
                     logprobs=torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -4.0], [-1.0, 0.0, 0.0, -2.0]]),
                     lengths=torch.tensor([2, 4, 4]), forced=torch.tensor([[False] * 4, [False] * 4,
                                                                            [False, True, True, False]]))
    responses, ended, x, targets, mask, sampled = rollout_batch([[1, 2], [3], [4, 5]], gen, END, 0, torch.device("cpu"))
    assert responses == [[8, END], [8, 9, 10, 11], [8, 30, 31, END]] and ended.tolist() == [1.0, 0.0, 1.0]
    assert mask.tolist() == [[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 0, 0, 1]]
    assert targets[mask.bool()].tolist() == [8, END, 8, 9, 10, 11, 8, END]  # the actions: what the policy chose
    assert sampled[mask.bool()].tolist() == [-1.0, -2.0, -1.0, -2.0, -3.0, -4.0, -1.0, -2.0]


def test_the_scoring_forward_reproduces_the_sampler_in_the_update_layout():
    policy, reference, value_model = tiny(seed=0), tiny(seed=1), tiny(n_scores=1, seed=2)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    gen = policy.generate(prompts, 6, temperature=0.7, eos_id=END, generator=torch.Generator().manual_seed(0))
    _, _, x, targets, mask, sampled = rollout_batch(prompts, gen, END, 0, torch.device("cpu"))
    old, ref, values = rollout_logprobs(policy, reference, value_model, x, targets, mask, [2, 0, 3, 1], 2, 0.7)
    torch.testing.assert_close(old, sampled, rtol=1e-4, atol=1e-5)  # the ratio starts from the policy that sampled
    with torch.no_grad():  # the KL is to the reference at the same temperature
        torch.testing.assert_close(ref, policy_logprobs(reference, x, targets, mask, 0.7)[0])
        torch.testing.assert_close(values, token_values(value_model, x))


def test_gae_gets_gamma_and_lambda_from_their_flags_and_the_kl_from_the_reward():
    args = argparse.Namespace(advantage="gae", gamma=1.0, lam=0.0, group_size=1)
    mask, values = torch.tensor([[0.0, 1, 1, 1]]), torch.tensor([[9.0, 1, 2, 3]])  # position 0: the prompt
    logprobs, ref_logprobs = torch.tensor([[5.0, -1.0, -2.0, -3.0]]), torch.tensor([[0.0, -1.2, -2.0, -2.6]])
    advantages, returns, kl_coef = rollout_advantages(args, 0.5, torch.tensor([1.0]), logprobs, ref_logprobs,
                                                      values, mask)
    # rewards -0.5 * log-ratio, the score on the last: -0.1, 0, 0.2 + 1. With lambda 0 each return is r + gamma *
    # V(next), V after the end 0; gamma 0 and lambda 1, swapped, would give r alone
    torch.testing.assert_close(returns, torch.tensor([[0.0, -0.1 + 2.0, 0.0 + 3.0, 1.2]]))
    assert kl_coef == 0.0 and abs(advantages[mask.bool()].mean()) < 1e-6  # the KL once, in the reward; whitened


def test_grpo_has_no_returns_and_its_kl_goes_into_the_loss_times_beta():
    args = argparse.Namespace(advantage="grpo", gamma=1.0, lam=0.95, group_size=2)
    logprobs, mask = torch.randn(4, 3), torch.ones(4, 3)
    advantages, returns, kl_coef = rollout_advantages(args, 0.3, torch.tensor([1.0, 0.0, 0.5, 0.5]), logprobs,
                                                      logprobs - 1.0, torch.zeros(4, 3), mask)
    assert returns is None and kl_coef == 0.3
    a = 0.5 / (torch.tensor([1.0, 0.0]).std().item() + 1e-6)  # the log-ratio to the reference moves no advantage
    torch.testing.assert_close(advantages, torch.tensor([[a] * 3, [-a] * 3, [0.0] * 3, [0.0] * 3]))
