"""
Stage 5: reinforcement learning with PPO: from human feedback (RLHF, the reward model), as
InstructGPT did it (Ouyang et al. 2022, sec. 3.5 and appendix C.4, after Ziegler et al. 2019 and
Stiennon et al. 2020), or from verifiable rewards (the hidden tests of the training prompts, as in
CodeRL and RLEF; or, on factual questions, the gold judge of answers and their evidence, Sparrow's
preference for supported answers), or both; with GAE and a value model, or group-relative
advantages (GRPO).

The models: the policy (starts as the SFT model), a frozen reference (the SFT model), the frozen
reward models (the preference RM and, as in Sparrow, the rule model), and for GAE a value model
(starts as the reward model, InstructGPT's choice). Each iteration:

  1. rollouts: sample responses from the policy, batched with the KV cache (group_size per prompt);
  2. the score of each response: --reward rm, the RM's score at the response's last token (where
     the RM was trained to read); tests, 1 if it passes the prompt's hidden tests in the sandbox,
     else 0; both, the RM score + test_coef * the test result; evidence (the prompts are factual
     questions, answered with the toolset), 1 if the gold judge finds the answer right and its quote
     in the right entry's docs (tools.judge_fact), else 0. In every variant minus rule_coef
     times the rule model's violation probabilities (Sparrow) and minus a penalty if it never ends;
  3. advantages. gae: the KL penalty at every token, R = score - beta * log(pi / pi_ref)
     (Stiennon et al. 2020, eq. 1), then GAE (Schulman et al. 2016) with the value model, whitened
     over the batch. grpo: each response's score minus its group's mean, over its group's standard
     deviation, at every token (Shao et al. 2024, sec. 4.1.2); no value model; the KL to the
     reference goes in the loss, as GRPO puts it;
  4. several epochs of minibatches of the clipped objective (Schulman et al. 2017, eq. 7), the
     clipped value loss, and with --ptx_coef > 0 the pretraining loss on generic text mixed into
     every policy update: PPO-ptx (InstructGPT, eq. 2).

    python ppo.py                                                     # PPO on the reward model
    python ppo.py --ptx_coef 1 --out_dir out/ppo_ptx                  # PPO-ptx
    python ppo.py --reward tests --advantage grpo --group_size 4 --out_dir out/grpo_tests
    python ppo.py --reward evidence --advantage grpo --group_size 4 --out_dir out/evidence_rl
    python ppo.py --preset gpu --sft out_gpu/sft/ckpt.pt --reward_dir out_gpu/reward --out_dir out_gpu/ppo
    python ppo.py --prompts examples/prompts.jsonl --sft out/sft_mine/ckpt.pt --reward_dir out/reward_mine \
        --out_dir out/ppo_mine                                        # your own prompts (data.read_prompts)

Honest simplifications: few iterations (a CPU budget; InstructGPT ran 256k episodes); the KL in the
reward uses the sampled log-ratio (k1), GRPO's in the loss the k3 one; the rule term is a penalty on
probabilities, not Sparrow's log-probability of compliance; GRPO groups of 4 (Shao et al.: 64). GRPO's loss,
like PPO's, is a mean over the minibatch's tokens (DAPO's token-level loss, Yu et al. 2025), not Shao et
al.'s eq. 3 mean of means, whose length bias Liu et al. 2025 find. --reward evidence scores with the judge
itself where Sparrow (Glaese et al. 2022) learned a reward model from ratings; all or nothing, since credit
for 'right' alone would pay for the unsupported claims Sparrow trains away; its rollouts run the tools, and
the results forced into a response are the environment's moves, off the action mask (tests pin it).
"""
import argparse
import json
import os
import random
import time
from statistics import fmean

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (HelpFormatter, StopFlag, check_finite, follow_core_share, log_metrics, nonneg_float, nonneg_int,
                    parse_args, positive_float, positive_int, setup_device, trim_log, write_json)
from data import (EOT, END, encode_chat, encode_conversation, fit_block, get_batch, load_tokenizer, load_tokens,
                  read_prompts, split_held_out, window_losses)
from model import last_token_scores, load_checkpoint, model_from_checkpoint, save_checkpoint
from judge import against_sft_lines, evaluate_against_sft, gold_eval_many, sample_responses
from tasks import encode_task, prompt_set
from tools import ToolRunner, evaluate_facts, fact_answer_tokens, facts_line, judge_fact, load_index, question_set

PRESETS = {
    "quick": dict(iterations=3, rollout_batch=16, minibatch=8, ppo_epochs=2, lr=1e-4, n_eval=16, ptx_batch=4,
                  n_fact_eval=16),
    "cpu": dict(iterations=24, rollout_batch=64, minibatch=16, ppo_epochs=2, lr=3e-5, n_eval=150, ptx_batch=2,
                n_fact_eval=200),
    "gpu": dict(iterations=200, rollout_batch=512, minibatch=64, ppo_epochs=2, lr=1e-5, n_eval=500, ptx_batch=4,
                n_fact_eval=446),
}  # n_fact_eval: sft.py's, so that --reward evidence is judged on the questions SFT was
PTX_SEED, LABELER_SEED, GENERIC_VAL_SEED = 1, 40, 0  # seed offsets: ptx batches, labelers; fixed windows
GENERIC_VAL_BATCHES, GENERIC_VAL_BATCH_SIZE = 16, 8  # the generic validation loss: 16 batches of 8 windows
SCORE_BATCH = 64  # sequences per forward pass when scoring and in the evaluation's KL
TESTS_TIMEOUT = 1.0  # seconds per program when the tests are the reward: a loop is a failure, fast


# -----------------------------------------------------------------------------
# the pieces of PPO, each a small function the loop below calls in order

def masked_mean(x, mask):
    """Mean over the entries where mask is 1; whatever sits elsewhere (even inf) is never read."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """Zero mean, unit variance over the masked entries only: padding and prompt positions must
    not move the statistics. Masked-out entries come back as 0."""
    mean_ = masked_mean(x, mask)
    var = masked_mean((x - mean_) ** 2, mask)
    return torch.where(mask.bool(), (x - mean_) * torch.rsqrt(var + eps), 0.0)


def pack_rollouts(prompts, responses, pad_id, device, forced=None):
    """Prompt + response, right-padded: inputs x and targets (B, L-1), and the mask of target
    positions that are the policy's actions: response tokens, less any tool-result tokens the
    generation forced (forced: per response, a bool per token), which the policy never chose.
    Index t of every (B, L-1) tensor is the state after token t, whose logits choose token t+1."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    L = max(len(s) for s in seqs)
    full = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
        if forced is not None:
            mask[i, len(p) - 1:len(p) + len(r) - 1] -= torch.tensor(forced[i], dtype=torch.float)
    return full[:, :-1].to(device), full[:, 1:].to(device), mask.to(device)


def rollout_batch(prompts, gen, end_id, pad_id, device):
    """What an iteration reads from its rollouts (gen: model.generate's Generation): the responses
    (token lists, the end token included where they ended); ended (B,), 0 for a response cut off at
    max_new_tokens, which pays the missing-end penalty; pack_rollouts' x, targets and mask, forced
    tool tokens out of the mask; and the sampler's log-probs of the actions in that layout (B, T),
    which the scoring forward must reproduce: PPO's ratio is to the policy that sampled."""
    lengths = gen.lengths.tolist()
    responses = [row[:n] for row, n in zip(gen.tokens.tolist(), lengths)]
    forced = [row[:n] for row, n in zip(gen.forced.tolist(), lengths)]
    ended = torch.tensor([r[-1] == end_id for r in responses], dtype=torch.float, device=device)
    x, targets, mask = pack_rollouts(prompts, responses, pad_id, device, forced)
    sampled_logprobs = torch.zeros_like(mask)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        sampled_logprobs[i, len(p) - 1:len(p) - 1 + n] = gen.logprobs[i, :n]  # 0 where forced, as off the mask
    return responses, ended, x, targets, mask, sampled_logprobs


def policy_logprobs(model, x, targets, mask, temperature):
    """Log-probabilities of the actions (targets where mask is 1) under the model's logits divided
    by the sampling temperature (the same in rollout, reference and update), and the entropy of
    each action's distribution; both (B, T), 0 off the mask. Only the actions' positions go through
    the output head (trained_only): the prompt's logits are never needed."""
    logits, _ = model(x, torch.where(mask.bool(), targets, -1), trained_only=True)  # (N, vocab)
    logits = logits.float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    keep = mask.bool()
    logprobs, entropy = torch.zeros_like(mask), torch.zeros_like(mask)
    logprobs[keep] = logp_all.gather(1, targets[keep][:, None]).squeeze(1)
    entropy[keep] = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def token_values(value_model, x):
    """The value of each state (B, T): index t is the state after token t, the one whose action is
    targets[:, t], so the value model reads the same position the policy's logits come from."""
    return value_model(x)[0][..., 0]  # a scored model's forward: (B, T, 1) scores


@torch.no_grad()
def rollout_logprobs(policy, reference, value_model, x, targets, mask, order, minibatch, temperature):
    """The rollout's old log-probs (the policy's), the reference's and the old values (B, T), from a
    fresh forward in exactly the layout of the update's first epoch (order, cut into minibatches),
    not from sampling: so the first ratio is exactly 1. All at the sampling temperature: the policy
    PPO's ratio starts from and the reference the KL is taken to are the distributions sampled from."""
    old_logprobs, ref_logprobs, old_values = (torch.zeros_like(mask) for _ in range(3))
    for start in range(0, len(order), minibatch):
        idx = torch.tensor(order[start:start + minibatch], device=mask.device)
        old_logprobs[idx] = policy_logprobs(policy, x[idx], targets[idx], mask[idx], temperature)[0]
        ref_logprobs[idx] = policy_logprobs(reference, x[idx], targets[idx], mask[idx], temperature)[0]
        if value_model is not None:
            old_values[idx] = token_values(value_model, x[idx]).float()
    return old_logprobs, ref_logprobs, old_values


@torch.no_grad()
def score_responses(reward_model, rule_model, sequences, pad_id):
    """The reward models' verdicts on whole responses, read at each sequence's last token (its end
    token, where the RM was trained to read): (RM scores (N,), rule violation probabilities (N, rules))."""
    rm, rules = [], []
    for start in range(0, len(sequences), SCORE_BATCH):
        chunk = sequences[start:start + SCORE_BATCH]
        rm.append(last_token_scores(reward_model, chunk, pad_id)[:, 0])
        rules.append(torch.sigmoid(last_token_scores(rule_model, chunk, pad_id)) if rule_model is not None
                     else torch.zeros(len(chunk), 0, device=rm[-1].device))  # no rule model: no rules to break
    return torch.cat(rm), torch.cat(rules)


def reward_from_tests(tasks, texts, timeout=TESTS_TIMEOUT):
    """The verifiable reward: 1.0 where the response passes its prompt's hidden tests in the
    sandbox, else 0.0 (fail, error, timeout); and the gold judge's verdicts, for the curves."""
    evals = gold_eval_many(tasks, texts, timeout)
    return torch.tensor([float(e["passed"]) for e in evals]), evals


def reward_from_evidence(index, questions, texts):
    """The verifiable reward on factual questions (Sparrow's preference for supported answers, judged
    by a program): 1.0 where the answer is right and attributable (its quote holds the evidence,
    verbatim from the right entry's docs), else 0.0; and the gold judge's verdicts, for the curves."""
    verdicts = [judge_fact(index, q, t) for q, t in zip(questions, texts)]
    return torch.tensor([float(v["right"] and v["attributable"]) for v in verdicts]), verdicts


def sequence_score(rm_score, passed, rule_probs, ended, reward, test_coef, rule_coef, missing_end_penalty):
    """The score of each whole response (B,): the reward model's, the tests' (passed: 1 or 0; for
    evidence, reward_from_evidence's), or rm + test_coef * tests; minus rule_coef times the rule
    model's violation probabilities summed over rules (Sparrow's rule reward, simplified), minus a
    fixed penalty when the response hit max_new_tokens without its end token, so that rambling on
    is never a way to dodge a low score."""
    base = {"rm": rm_score, "tests": passed, "evidence": passed, "both": rm_score + test_coef * passed}[reward]
    return base - rule_coef * rule_probs.sum(1) - missing_end_penalty * (1.0 - ended)


def shaped_rewards(score, logprobs, ref_logprobs, mask, beta):
    """Per-token rewards (B, T) and the per-token log-ratio to the reference: -beta * log(pi/pi_ref)
    at every action (Ziegler et al. 2019, eq. 2), plus the sequence score at the last action, after
    which the RM read the response. 0 outside the mask."""
    log_ratio = (logprobs - ref_logprobs) * mask
    rewards = -beta * log_ratio
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)  # (B,) last action's position
    rewards[torch.arange(mask.size(0), device=mask.device), last] += score
    return rewards, log_ratio


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016) on (B, T) tensors where mask marks
    each row's actions: its response tokens, with holes where a tool's result was forced (those
    are the environment's moves, so the next action's value is the next state's). The episode ends
    after the last action, so the value after it is 0. Returns (advantages, returns), returns =
    advantages + values (the value model's targets), both 0 outside the mask, before whitening."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # the advantage of the next action
    next_value = torch.zeros_like(running)  # the value at the next action; 0 after the last
    for t in reversed(range(T)):
        acting = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # the TD error
        running = torch.where(acting, delta + gamma * lam * running, running)
        next_value = torch.where(acting, values[:, t], next_value)
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def gae_advantages(rewards, values, mask, gamma, lam):
    """PPO's advantages and returns: GAE, then the advantages whitened over the batch's actions;
    the returns (the value model's targets) come from the advantages before whitening."""
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask), returns


def group_advantages(scores, group_size, mask, eps=1e-6):
    """GRPO's advantages (Shao et al. 2024, eq. 3, outcome supervision): each response's score minus
    the mean of its group (the responses to the same prompt), divided by the group's standard
    deviation, given to every action of the response. A group whose scores are all equal teaches
    nothing: its advantages are exactly 0."""
    groups = scores.view(-1, group_size)  # (prompts, G)
    centered = groups - groups.mean(1, keepdim=True)
    normalized = centered / (groups.std(1, keepdim=True) + eps)
    return normalized.view(-1, 1) * mask


def rollout_advantages(args, beta, score, logprobs, ref_logprobs, values, mask):
    """What the update learns from, and where the KL to the reference goes: (advantages (B, T),
    returns (B, T) or None, the KL's coefficient in the loss). gae: the KL penalty in every token's
    reward, GAE, whitened; the returns are the value model's targets; no KL in the loss. grpo:
    group-relative advantages; no value model, no returns; the KL in the loss, times beta (Shao et
    al. 2024, eq. 3). It reads ppo.py's flags (advantage, gamma, lam, group_size) from args itself,
    so that no call can hand GAE its two discounts the wrong way round."""
    if args.advantage == "gae":
        rewards, _ = shaped_rewards(score, logprobs, ref_logprobs, mask, beta)
        advantages, returns = gae_advantages(rewards, values * mask, mask, args.gamma, args.lam)
        return advantages, returns, 0.0
    return group_advantages(score, args.group_size, mask), None, beta


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """The clipped surrogate (Schulman et al. 2017, eq. 7), as a loss, averaged over actions. Also
    returns the fraction of actions where the clip was active."""
    ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, 0.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def ppo_value_loss(values, old_values, returns, mask, clip):
    """Squared error to the returns, with the new values kept within clip of the old ones, the
    worse of the two taken (the PPO2 baselines; Ziegler et al. 2019 code)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def minibatch_losses(policy, value_model, mb, temperature, clip, value_clip, kl_coef=0.0, ptx=None, ptx_coef=0.0):
    """The losses of one minibatch, as the update loop computes them: the clipped surrogate on the
    ratio of the policy's log-probs to the rollout's; with kl_coef, the k3 estimate of KL(pi || ref)
    added to the loss (GRPO); with ptx, a batch (inputs, targets) of generic text, ptx_coef times its
    language-modelling loss, i.e. -ptx_coef * E[log pi(x)] (PPO-ptx, InstructGPT eq. 2); with a
    value model, the clipped value loss. Returns (policy loss, value loss or None, stats)."""
    m = mb["mask"]
    logprobs, entropy = policy_logprobs(policy, mb["x"], mb["targets"], m, temperature)
    pg_loss, clip_frac = ppo_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], m, clip)
    policy_loss = pg_loss
    with torch.no_grad():
        log_r = (logprobs - mb["old_logprobs"]) * m
        stats = dict(pg_loss=pg_loss.item(), clip_frac=clip_frac.item(), entropy=masked_mean(entropy, m).item(),
                     approx_kl=masked_mean(torch.exp(log_r) - 1 - log_r, m).item(),  # k3, policy vs rollout
                     ratio_dev=((torch.exp(log_r) - 1).abs() * m).max().item())
    if kl_coef:
        log_ref = mb["ref_logprobs"] - logprobs
        kl_ref = masked_mean(torch.exp(log_ref) - 1 - log_ref, m)  # k3 (Shao, eq. 4)
        policy_loss = policy_loss + kl_coef * kl_ref
        stats["kl_ref"] = kl_ref.item()
    if ptx is not None and ptx_coef:
        ptx_loss = policy(*ptx)[1]
        policy_loss = policy_loss + ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    value_loss = None
    if value_model is not None:
        value_loss = ppo_value_loss(token_values(value_model, mb["x"]), mb["old_values"], mb["returns"], m,
                                    value_clip)
        stats["vf_loss"] = value_loss.item()
    return policy_loss, value_loss, stats


def adaptive_beta(beta, kl, target, n_samples, horizon):
    """The adaptive KL controller of Ziegler et al. 2019 (sec. 2.2, and their code): beta moves by
    the proportional error, clipped to 20%, scaled by how many samples the update saw over the
    horizon: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return beta * (1.0 + error * n_samples / horizon)


# -----------------------------------------------------------------------------
# judging the policy after training against the SFT model: the KL, the generic-text loss (the gold judge: judge.py)

@torch.no_grad()
def kl_per_response(policy, reference, prompts, samples, pad_id, temperature, autocast):
    """KL(policy || reference) of each sampled response (sample_responses' dicts, one per prompt): its summed
    log-ratio over the policy's actions (the k1 estimator, whose mean over the policy's own samples is the
    KL). Never call it inside `with autocast`: one torch.autocast entered twice restores, on the way out, the
    state it found inside itself, so autocast stays on after both exits, with a stale cache of cast weights
    (the in-process rehearsal's later optimizer steps then changed nothing)."""
    device, kls = next(policy.parameters()).device, []
    for start in range(0, len(samples), SCORE_BATCH):
        chunk = slice(start, start + SCORE_BATCH)
        x, targets, mask = pack_rollouts(prompts[chunk], [s["tokens"] for s in samples[chunk]], pad_id, device,
                                         [s["forced"] for s in samples[chunk]])
        with autocast:
            lp = policy_logprobs(policy, x, targets, mask, temperature)[0]
            ref_lp = policy_logprobs(reference, x, targets, mask, temperature)[0]
        kls += ((lp - ref_lp) * mask).sum(1).tolist()
    return kls


def generic_val_losses(model, data, autocast):
    """Loss per batch of generic validation text, on the same windows every time: what PPO-ptx protects."""
    return window_losses(model, data, GENERIC_VAL_BATCHES, GENERIC_VAL_BATCH_SIZE, model.config.block_size,
                         GENERIC_VAL_SEED, autocast)


# -----------------------------------------------------------------------------
# the flags (--preset fills their defaults; `python ppo.py --preset quick --help` shows them)

def parse_flags(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--sft", default="out/sft/ckpt.pt", help="SFT checkpoint: the policy's start and the "
                        "reference; its folder's samples_<eval_set>.json are the SFT samples compared against")
    parser.add_argument("--reward_dir", default="out/reward", help="folder with reward.pt and rules.pt (without "
                        "rules.pt, e.g. from reward.py --pairs, the rule term is off)")
    parser.add_argument("--prompts", default=None, help="your own RL prompts instead of the world's: JSON Lines of "
                        "{prompt} (data.read_prompts); every 20th is held out for the evaluation")
    parser.add_argument("--generic_data", default="out/data/generic", help="generic token files, for ptx and eval")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--docs_index", default="out/docs/index.json", help="the documentation index (tools.py "
                        "--out_dir out/docs), for --reward evidence")
    parser.add_argument("--out_dir", default="out/ppo", help="checkpoint, log and summary go here")
    # rollouts
    parser.add_argument("--iterations", type=nonneg_int, help="rollout-then-update iterations (0: judge the SFT "
                        "policy)")
    parser.add_argument("--rollout_batch", type=positive_int, help="responses per iteration")
    parser.add_argument("--group_size", type=positive_int, default=1, help="responses per prompt (grpo: the group)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, used in "
                        "every log-prob")
    parser.add_argument("--max_new_tokens", type=positive_int, default=96, help="longest response to a programming "
                        "request (a factual answer: tools.FACT_MAX_NEW_TOKENS, within the block)")
    # reward
    parser.add_argument("--reward", default="rm", choices=("rm", "tests", "both", "evidence"), help="what scores a "
                        "response: the reward model, the prompt's hidden tests, rm + test_coef * tests, or on "
                        "factual questions the gold judge (right and attributable)")
    parser.add_argument("--test_coef", type=nonneg_float, default=1.0, help="weight of the tests in --reward both")
    parser.add_argument("--rule_coef", type=nonneg_float, default=1.0, help="weight of the rule model's violation "
                        "probabilities")
    parser.add_argument("--missing_end_penalty", type=nonneg_float, default=1.0, help="subtracted when a response "
                        "never ends")
    parser.add_argument("--beta", type=nonneg_float, default=0.15, help="KL penalty coefficient (InstructGPT: 0.02, "
                        "on another reward scale; at 0.05 ours drifts to ~3 nats and games the RM, see README)")
    parser.add_argument("--kl_target", type=nonneg_float, default=0.0, help="adaptive KL controller's target in "
                        "nats per response (Ziegler et al. 2019); 0: fixed beta")
    parser.add_argument("--kl_horizon", type=positive_int, default=10000, help="the adaptive controller's horizon "
                        "in samples (Ziegler et al.: 10000)")
    # advantages and the update
    parser.add_argument("--advantage", default="gae", choices=("gae", "grpo"), help="GAE with a value model (PPO), "
                        "or group-relative advantages without one (GRPO)")
    parser.add_argument("--ppo_epochs", type=positive_int, help="passes over each rollout batch")
    parser.add_argument("--minibatch", type=positive_int, help="responses per minibatch")
    parser.add_argument("--clip", type=positive_float, default=0.2, help="PPO ratio clip epsilon")
    parser.add_argument("--value_clip", type=positive_float, default=0.2, help="value clip around the old values")
    parser.add_argument("--gamma", type=nonneg_float, default=1.0, help="discount (1: the episode is one response)")
    parser.add_argument("--lam", type=nonneg_float, default=0.95, help="GAE lambda")
    parser.add_argument("--lr", type=positive_float, help="policy learning rate")
    parser.add_argument("--value_lr_ratio", type=positive_float, default=3.0, help="value learning rate over the "
                        "policy's")
    parser.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="clip each model's gradient norm (0: off)")
    parser.add_argument("--ptx_coef", type=nonneg_float, default=0.0, help="pretraining loss weight (PPO-ptx); "
                        "0: plain PPO")
    parser.add_argument("--ptx_batch", type=positive_int, help="generic-text sequences per ptx minibatch")
    # evaluation
    parser.add_argument("--eval_set", default="test", choices=("test", "dev"), help="held-out prompts to judge on: "
                        "dev for choosing settings, test for the report")
    parser.add_argument("--n_eval", type=positive_int, help="held-out prompts for the final evaluation")
    parser.add_argument("--eval_samples", type=positive_int, default=4, help="samples per held-out prompt")
    parser.add_argument("--n_fact_eval", type=positive_int, help="with --reward evidence: held-out factual "
                        "questions judged (sft.py's sft_eval set, the first n)")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="autocast: bf16 where "
                        "the device supports it (auto), or as asked (run.py --rehearse: bf16 on a CPU)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds prompts, sampling and minibatches")
    args = parse_args(parser, PRESETS, argv)
    if args.advantage == "grpo" and args.group_size < 2:
        parser.error("--advantage grpo needs --group_size of at least 2: advantages are relative to the group")
    if args.rollout_batch % args.group_size or args.rollout_batch % args.minibatch:
        parser.error(f"--rollout_batch {args.rollout_batch} must be a multiple of --group_size {args.group_size} "
                     f"and of --minibatch {args.minibatch}")
    if args.prompts and args.reward != "rm":
        parser.error(f"--reward {args.reward} needs the world's hidden tests or questions; your --prompts have "
                     f"none: use --reward rm")
    return args


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    args = parse_flags()

    # -----------------------------------------------------------------------------
    # device, dtype
    device, autocast = setup_device(args.device, args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    torch.manual_seed(args.seed)

    # -----------------------------------------------------------------------------
    # data: RL prompts (training combinations, a pool no SFT demonstration comes from) and held-out ones to judge
    # the policy on, encoded, with the world's tasks beside them (their hidden tests: the reward for --reward
    # tests, and the gold judge); generic text, for ptx and the loss PPO-ptx protects
    enc = load_tokenizer(args.tokenizer)
    pad_id, end_id = enc.encode_single_token(EOT), enc.encode_single_token(END)
    prompts_per_iteration = args.rollout_batch // args.group_size
    n_pool = args.iterations * prompts_per_iteration
    if args.prompts:  # yours: those that fit with a whole response, every 20th held out, the rest in a new order
        # each pass; no hidden tests, so no tasks: the reward model alone scores, and no gold judge
        block_size = load_checkpoint(args.sft, ["sft"], enc)["model_args"]["block_size"]
        encoded = [encode_conversation(enc, turns)[0] for turns in read_prompts(args.prompts)]
        train_prompts, eval_prompts = split_held_out(fit_block(
            encoded, [len(p) + args.max_new_tokens for p in encoded], block_size, args.prompts))
        n_skipped, n = len(encoded) - len(train_prompts) - len(eval_prompts), len(train_prompts)
        prompt_pool = [train_prompts[i] for e in range(-(-n_pool // n))  # enough passes for every iteration
                       for i in random.Random(args.seed + e).sample(range(n), n)][:n_pool]
        print(f"data: {len(train_prompts)} of your prompts from {args.prompts} ({n_pool / len(train_prompts):.1f} "
              f"passes), {len(eval_prompts)} held out, {n_skipped} skipped; no hidden tests: the reward model alone")
        task_pool, eval_tasks, eval_prompts = None, None, eval_prompts[:args.n_eval]
    else:
        task_pool, eval_tasks = prompt_set("ppo_train", n_pool, args.seed), prompt_set(args.eval_set, args.n_eval,
                                                                                       args.seed)
        prompt_pool, eval_prompts = ([encode_task(enc, t)[0] for t in ts] for ts in (task_pool, eval_tasks))
        n_skipped = 0
    docs, question_pool, fact_questions = None, None, []
    if args.reward == "evidence":  # factual questions replace the requests as rollout prompts (their answers
        # judged by tools.judge_fact); the test requests above still judge what this did to programming
        docs = load_index(args.docs_index)
        question_pool = question_set(docs, "rl_train", n_pool, args.seed)
        fact_questions = question_set(docs, "sft_eval", args.n_fact_eval, args.seed)  # what SFT was judged on
        task_pool, prompt_pool = None, [encode_chat(enc, q.prompt)[0] for q in question_pool]
    generic_train, generic_val = (load_tokens(args.generic_data, split, enc) for split in ("train", "val"))

    # -----------------------------------------------------------------------------
    # models: all with dropout off (it would make old and new log-probs disagree)
    sft_ckpt = load_checkpoint(args.sft, ["sft"], enc, device)
    reward_ckpt = load_checkpoint(os.path.join(args.reward_dir, "reward.pt"), ["reward"], enc, device)
    rules_path = os.path.join(args.reward_dir, "rules.pt")
    rules_ckpt = load_checkpoint(rules_path, ["rules"], enc, device) if os.path.exists(rules_path) else None
    if rules_ckpt is None:  # reward.py --pairs trains none: preference pairs carry no rule labels
        print(f"no rule model in {args.reward_dir} (no rules.pt): the rule term is off")
    # a finished checkpoint resumes at its last iteration: the loop ends at once and the evaluation runs
    resume = load_checkpoint(ckpt_path, ["ppo"], enc, device) if os.path.exists(ckpt_path) else None
    policy = model_from_checkpoint(resume or sft_ckpt, device, dropout=0.0)
    reference = model_from_checkpoint(sft_ckpt, device, dropout=0.0).requires_grad_(False)
    value_model = None
    if args.advantage == "gae":
        value_model = model_from_checkpoint(reward_ckpt, device, dropout=0.0)  # InstructGPT: value from the RM
        if resume is not None:
            value_model.load_state_dict(resume["value_model"])
    reward_model = model_from_checkpoint(reward_ckpt, device, dropout=0.0).requires_grad_(False)
    rule_model = rules_ckpt and model_from_checkpoint(rules_ckpt, device, dropout=0.0).requires_grad_(False)
    for m in filter(None, (policy, reference, value_model, reward_model, rule_model)):
        m.eval()  # eval mode throughout: no dropout anywhere, old and new log-probs come out equal
    # a factual answer needs room for its lookup's result (as sft.py judges them); a request, --max_new_tokens;
    # the toolset at hand for factual questions: lookups run mid-answer (LaMDA)
    rollout_tokens = args.max_new_tokens if docs is None else fact_answer_tokens(
        prompt_pool + [encode_chat(enc, q.prompt)[0] for q in fact_questions], policy.config.block_size)
    tool_runner = ToolRunner(enc, docs) if docs else None

    # -----------------------------------------------------------------------------
    # optimizers, at a constant learning rate
    policy_opt = policy.configure_optimizers(args.lr, 0.0, (0.9, 0.95), device.type)
    value_opt = value_model and value_model.configure_optimizers(args.lr * args.value_lr_ratio, 0.0, (0.9, 0.95),
                                                                 device.type)
    trained = [(policy, policy_opt)] + ([(value_model, value_opt)] if value_model else [])
    start, beta = 0, args.beta
    if resume is not None:
        policy_opt.load_state_dict(resume["policy_opt"])
        if value_opt is not None:
            value_opt.load_state_dict(resume["value_opt"])
        start, beta = resume["iteration"], resume["beta"]
        trim_log(log_path, "iteration", start)
        print(f"resuming {ckpt_path} at iteration {start}")
    sample_rng = torch.Generator().manual_seed(args.seed + start)
    ptx_rng = torch.Generator().manual_seed(args.seed + PTX_SEED + start)
    shuffle_rng = random.Random(args.seed + start)

    def save(iteration, finished):
        save_checkpoint(ckpt_path, policy, "ppo", enc, policy_opt=policy_opt.state_dict(), iteration=iteration,
                        beta=beta, finished=finished, config=vars(args), generic_before=generic_before,
                        seconds=t_phase, **({} if value_model is None else dict(
                            value_model=value_model.state_dict(), value_opt=value_opt.state_dict())))

    # -----------------------------------------------------------------------------
    # the loop
    generic_before = generic_val_losses(policy, generic_val, autocast) if resume is None else resume["generic_before"]
    stop = StopFlag()
    t_phase = dict(rollout=0.0, score=0.0, update=0.0) if resume is None else resume["seconds"]
    for it in tqdm(range(start, args.iterations + 1), initial=start, total=args.iterations + 1, desc="ppo",
                   dynamic_ncols=True):
        if stop.stop:
            save(it, finished=False)
            print(f"saved {ckpt_path} at iteration {it}; run the same command to resume")
            raise SystemExit(130)
        if it == args.iterations:
            save(it, finished=True)
            break

        # ---------------- ROLLOUT ----------------
        follow_core_share()
        t0 = time.perf_counter()
        this = slice(it * prompts_per_iteration, (it + 1) * prompts_per_iteration)
        prompts = [p for p in prompt_pool[this] for _ in range(args.group_size)]  # group_size times, side by side
        tasks = task_pool and [t for t in task_pool[this] for _ in range(args.group_size)]
        questions = question_pool and [q for q in question_pool[this] for _ in range(args.group_size)]
        with torch.no_grad(), autocast:
            gen = policy.generate(prompts, rollout_tokens, args.temperature, eos_id=end_id, pad_id=pad_id,
                                  generator=sample_rng, tool_runner=tool_runner)
        responses, ended, x, targets, mask, sampled_logprobs = rollout_batch(prompts, gen, end_id, pad_id, device)
        t1 = time.perf_counter()

        # ---------------- SCORING ----------------
        B = len(prompts)
        order = shuffle_rng.sample(range(B), B)  # the update's first epoch takes its minibatches in this order
        with autocast:
            old_logprobs, ref_logprobs, old_values = rollout_logprobs(policy, reference, value_model, x, targets, mask,
                                                                      order, args.minibatch, args.temperature)
            rm_score, rule_probs = score_responses(reward_model, rule_model,
                                                   [p + r for p, r in zip(prompts, responses)], pad_id)
        passed, evals, verdicts = torch.zeros(B), None, None  # yours have no hidden tests to run
        texts = [enc.decode(r[:-1] if r[-1] == end_id else r) for r in responses]
        if tasks:
            passed, evals = reward_from_tests(tasks, texts)
        if questions:
            passed, verdicts = reward_from_evidence(docs, questions, texts)
        score = sequence_score(rm_score, passed.to(device), rule_probs, ended, args.reward, args.test_coef,
                               args.rule_coef, args.missing_end_penalty)
        advantages, returns, kl_coef = rollout_advantages(args, beta, score, old_logprobs, ref_logprobs, old_values,
                                                          mask)
        t2 = time.perf_counter()

        # ---------------- UPDATE ----------------
        stats = []
        for epoch in range(args.ppo_epochs):
            if epoch > 0:
                order = shuffle_rng.sample(range(B), B)
            for mb in range(0, B, args.minibatch):
                idx = torch.tensor(order[mb:mb + args.minibatch], device=device)
                batch = dict(x=x[idx], targets=targets[idx], mask=mask[idx], old_logprobs=old_logprobs[idx],
                             ref_logprobs=ref_logprobs[idx], advantages=advantages[idx], old_values=old_values[idx],
                             returns=None if returns is None else returns[idx])
                ptx = get_batch(generic_train, args.ptx_batch, policy.config.block_size, ptx_rng, device) \
                    if args.ptx_coef > 0 else None
                with autocast:
                    policy_loss, value_loss, mb_stats = minibatch_losses(
                        policy, value_model, batch, args.temperature, args.clip, args.value_clip,
                        kl_coef=kl_coef, ptx=ptx, ptx_coef=args.ptx_coef)
                # separate models: each gets only its own loss's gradient
                (policy_loss if value_loss is None else policy_loss + value_loss).backward()
                for model, optimizer in trained:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
                    check_finite(norm)  # a diverged loss stops the run here, before the step spreads it
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                stats.append(mb_stats)
        t3 = time.perf_counter()
        for phase, dt in zip(t_phase, (t1 - t0, t2 - t1, t3 - t2)):
            t_phase[phase] += dt

        # ---------------- LOGGING ----------------
        kl = ((old_logprobs - ref_logprobs) * mask).sum(1).mean().item()  # nats per response, KL(policy || SFT)
        # the scoring forward against the sampler: float error only (more under bf16 than fp32), unless their
        # temperatures or models differ, when PPO's ratio would not start from the policy that sampled
        sampler_dev = ((old_logprobs - sampled_logprobs).abs() * mask).max().item()
        row = dict(iteration=it, score=score.mean().item(), rm_score=rm_score.mean().item(),
                   **({} if evals is None else dict(pass_rate=passed.mean().item(),
                                                    utility=fmean(e["utility"] for e in evals))),
                   **({} if verdicts is None else dict(right_and_attributable=passed.mean().item(), **{
                       k: fmean(v[k] for v in verdicts) for k in ("right", "attributable", "found")})),
                   rule_prob=rule_probs.sum(1).mean().item(), kl=kl, beta=beta, ended=ended.mean().item(),
                   response_len=mask.sum(1).mean().item(), sampler_dev=sampler_dev,
                   first_ratio_dev=stats[0]["ratio_dev"],
                   **{k: fmean(s[k] for s in stats) for k in stats[0] if k != "ratio_dev"},
                   ms_rollout=(t1 - t0) * 1000, ms_score=(t2 - t1) * 1000, ms_update=(t3 - t2) * 1000)
        if value_model is not None:
            flat_returns, flat_values = returns[mask.bool()], old_values[mask.bool()]
            unexplained = torch.var(flat_returns - flat_values) / torch.var(flat_returns).clamp(min=1e-8)
            row["explained_var"] = (1 - unexplained).item()
        log_metrics(log_path, **row)
        tqdm.write(f"iter {it:4d}/{args.iterations} | score {row['score']:+.3f} | rm {row['rm_score']:+.3f} | "
                   + ("" if evals is None else f"pass {row['pass_rate']:.2f} | ")
                   + ("" if verdicts is None else f"right+attr {row['right_and_attributable']:.2f} | ") +
                   f"kl {kl:6.3f} | beta {beta:.3f} | ent {row['entropy']:.3f} | "
                   f"clip {row['clip_frac']:.3f} | len {row['response_len']:5.1f} | {(t3 - t0):5.1f} s")
        if args.kl_target > 0:
            beta = adaptive_beta(beta, kl, args.kl_target, B, args.kl_horizon)

    # -----------------------------------------------------------------------------
    # the final summary, on the held-out prompts: the policy's samples beside the SFT model's (those sft.py wrote
    # for these prompts, else sampled here the same way): the reward model's scores and the lengths of both, the
    # KL to SFT, the generic-text loss before and after; where the world's gold judge is, its verdicts and the
    # simulated labelers' win rate against SFT, sample by sample (your prompts have no hidden tests, no labeler)
    follow_core_share()
    n, t0 = args.eval_samples, time.time()
    sft_path = os.path.join(os.path.dirname(args.sft), f"samples_{args.eval_set}.json")
    with autocast:
        samples = sample_responses(policy, enc, eval_prompts, n, args.temperature, args.max_new_tokens,
                                   torch.Generator().manual_seed(args.seed))
        if eval_tasks and os.path.exists(sft_path):  # the samples every row of the report compares to
            with open(sft_path) as f:
                sft_samples = json.load(f)["samples"]
        else:
            sft_samples = sample_responses(reference, enc, eval_prompts, n, args.temperature, args.max_new_tokens,
                                           torch.Generator().manual_seed(args.seed))
        n_sft = len(sft_samples) // len(eval_prompts)
        rm_ours, rm_sft = (score_responses(reward_model, rule_model, [p + s["tokens"] for p, s in zip(
            [p for p in eval_prompts for _ in range(k)], ss)], pad_id)[0].tolist()
            for ss, k in ((samples, n), (sft_samples, n_sft)))
    kls = kl_per_response(policy, reference, [p for p in eval_prompts for _ in range(n)], samples, pad_id,
                          args.temperature, autocast)  # outside autocast: it enters it itself
    summary = dict(kl=kls, rm_score=rm_ours, rm_score_sft=rm_sft, response_len=[len(s["tokens"]) for s in samples],
                   response_len_sft=[len(s["tokens"]) for s in sft_samples], ended=[s["ended"] for s in samples],
                   generic_val_losses_before=generic_before,
                   generic_val_losses_after=generic_val_losses(policy, generic_val, autocast),
                   n_eval=len(eval_prompts), eval_samples=n, sft_samples=n_sft, reward=args.reward,
                   advantage=args.advantage, ptx_coef=args.ptx_coef, beta=args.beta, kl_target=args.kl_target,
                   kl_horizon=args.kl_horizon, rule_model=rule_model is not None, seconds=t_phase,
                   train_seconds=sum(t_phase.values()), iterations=args.iterations,
                   episodes=args.iterations * args.rollout_batch, examples=[s["text"] for s in samples[:n * 3:n]])
    if eval_tasks:
        with autocast:
            judged = evaluate_against_sft(
                policy, enc, eval_tasks, samples, sft_samples, prompt_set("probe", args.n_eval, args.seed),
                prompt_set("followup", args.n_eval, args.seed), random.Random(args.seed + LABELER_SEED),
                args.max_new_tokens)
        summary.update(judged, eval_set=args.eval_set)
        write_json(os.path.join(args.out_dir, f"samples_{args.eval_set}.json"), dict(
            n_samples=n, prompts=[t.prompt for t in eval_tasks],
            samples=[{k: v for k, v in s.items() if k != "logprobs"} for s in samples]))
    else:
        summary.update(prompts=args.prompts, n_skipped=n_skipped, unavailable={
            "gold judge (pass@1, utility, violations, hack rate)": "your prompts have no hidden tests",
            "win rate vs SFT": "no simulated labeler knows your preference (the RM's score of SFT's samples stands "
                               "beside)", **({} if rule_model else {"rule term": "no rules.pt in --reward_dir"})})
        write_json(os.path.join(args.out_dir, "samples_heldout.json"), dict(  # for a judge of your own
            prompts=[enc.decode(p) for p in eval_prompts], n_samples=n, ppo=[s["text"] for s in samples],
            sft=[s["text"] for s in sft_samples]))
    if fact_questions:  # Sparrow's measure, by the judge itself: supported and right, after RL (SFT's in sft.py's)
        with autocast:
            summary["facts"] = evaluate_facts(policy, enc, docs, fact_questions, rollout_tokens)
    summary["eval_seconds"] = time.time() - t0
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print(f"held-out prompts ({len(eval_prompts)} x {n} samples): RM score {fmean(rm_ours):+.3f} (SFT "
          f"{fmean(rm_sft):+.3f}) | KL to SFT {fmean(kls):.2f} nats | length {fmean(summary['response_len']):.1f} "
          f"tokens (SFT {fmean(summary['response_len_sft']):.1f}) | generic val loss {fmean(generic_before):.4f} -> "
          f"{fmean(summary['generic_val_losses_after']):.4f}")
    if eval_tasks:
        print(against_sft_lines(summary, args.eval_set))
    if fact_questions:
        print(facts_line(summary["facts"]))
    for what, why in summary.get("unavailable", {}).items():
        print(f"not available: {what}: {why}")
    print("example:\n" + summary["examples"][0])
