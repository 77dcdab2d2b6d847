"""
Stage 5: reinforcement learning from human feedback (RLHF) with PPO, as InstructGPT did it
(Ouyang et al. 2022, sec. 3.5 and appendix C.4), after Ziegler et al. 2019 and Stiennon et al. 2020.

Four models: the policy (starts as the SFT model), a frozen reference (the SFT model), a value
model (starts as the reward model, InstructGPT's choice), and the frozen reward models (the
preference RM and, as in Sparrow, the rule model). Each iteration:

  1. rollouts: sample one response per prompt from the policy, batched with the KV cache;
  2. reward: the RM's score at the response's last token (where the RM was trained to read),
     minus a penalty if the response never ends, minus rule_coef times the rule model's violation
     probabilities (Sparrow), and at every token minus beta times the log-ratio to the reference:
         R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))        (Stiennon et al. 2020, eq. 1)
  3. advantages by GAE (Schulman et al. 2016) with the value model, whitened over response tokens;
  4. several epochs of minibatches of the clipped PPO objective (Schulman et al. 2017, eq. 7),
     a clipped value loss, and with --ptx_coef > 0 the pretraining loss on generic text mixed into
     every policy update: PPO-ptx (InstructGPT, eq. 2), which limits the regression on the text
     the model knew before.

    python ppo.py                                       # cpu preset: PPO
    python ppo.py --ptx_coef 1 --out_dir out/ppo_ptx    # PPO-ptx
    python ppo.py --preset gpu --sft out_gpu/sft/ckpt.pt --reward_dir out_gpu/reward --out_dir out_gpu/ppo

Honest simplifications: one response per prompt and few iterations (a CPU budget; InstructGPT
ran 256k episodes); the per-token KL uses the sampled log-ratio (k1), the usual estimator; the
rule term is a penalty on probabilities rather than Sparrow's log-probability of compliance.
"""
import argparse
import os
import random
import time
from statistics import fmean

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (HelpFormatter, StopFlag, clip_and_step, log_metrics, nonneg_float, nonneg_int, parse_args,
                    positive_float, positive_int, setup_device, trim_log, write_json)
from data import EOT, END, encode_chat, get_batch, load_tokenizer, load_tokens
from model import load_checkpoint, model_from_checkpoint, save_checkpoint, token_logprobs
from tasks import evaluate_policy, prompt_set

PRESETS = {
    "quick": dict(iterations=3, rollout_batch=16, minibatch=8, ppo_epochs=2, lr=1e-4, n_eval=16),
    "cpu": dict(iterations=30, rollout_batch=64, minibatch=16, ppo_epochs=2, lr=3e-5, n_eval=150),
    "gpu": dict(iterations=200, rollout_batch=512, minibatch=64, ppo_epochs=2, lr=1e-5, n_eval=500),
}
PTX_SEED, GENERIC_VAL_SEED = 1, 0  # seed offsets: ptx batches; the fixed generic validation windows
GENERIC_VAL_BATCHES, GENERIC_VAL_BATCH_SIZE = 16, 8  # the generic validation loss: 16 windows of 8
SCORE_BATCH = 64  # sequences per forward pass in the evaluation's KL


def masked_mean(x, mask):
    """Mean over the entries where mask is 1; whatever sits elsewhere (even inf) is never read."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """Zero mean, unit variance over the masked entries only: padding and prompt positions must
    not move the statistics. Masked-out entries come back as 0."""
    mean_ = masked_mean(x, mask)
    var = masked_mean((x - mean_) ** 2, mask)
    return torch.where(mask.bool(), (x - mean_) * torch.rsqrt(var + eps), 0.0)


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


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """The clipped surrogate (Schulman et al. 2017, eq. 7), as a loss, averaged over response
    tokens. Also returns the fraction of tokens where the clip was active."""
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


def sequence_score(rm_score, rule_probs, ended, rule_coef, missing_end_penalty):
    """The reward for a whole response (B,): the preference RM's score, minus rule_coef times the
    rule model's violation probabilities summed over rules (Sparrow's rule reward, simplified),
    minus a fixed penalty when the response hit max_new_tokens without its end token, so that
    rambling on is never a way to dodge a low score."""
    return rm_score - rule_coef * rule_probs.sum(1) - missing_end_penalty * (1.0 - ended)


def shaped_rewards(score, logprobs, ref_logprobs, mask, beta):
    """Per-token rewards (B, T) and the per-token log-ratio to the reference: -beta * log(pi/pi_ref)
    at every response token (Ziegler et al. 2019, eq. 2), plus the sequence score at the last
    response token, the action after which the RM read the response. 0 outside the mask."""
    log_ratio = (logprobs - ref_logprobs) * mask
    rewards = -beta * log_ratio
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)  # (B,) last response position
    rewards[torch.arange(mask.size(0), device=mask.device), last] += score
    return rewards, log_ratio


def adaptive_beta(beta, kl, target, horizon_step=0.1):
    """Ziegler et al. 2019, sec. 2.2: beta grows when KL is above target and shrinks below it,
    by at most 20% of horizon_step per update."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return beta * (1.0 + horizon_step * error)


def policy_logprobs(model, x, targets, temperature):
    """Per-token log-probabilities of targets under the model's logits divided by the sampling
    temperature (the same in rollout, reference and update), and the entropy, both (B, T)."""
    logits = model(x)[0].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return token_logprobs(logits, targets), entropy


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


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--sft", default="out/sft/ckpt.pt", help="SFT checkpoint: the policy's start and the reference")
    parser.add_argument("--reward_dir", default="out/reward", help="folder with reward.pt and rules.pt")
    parser.add_argument("--generic_data", default="out/data/generic", help="generic token files, for ptx and eval")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/ppo", help="checkpoint, log and summary go here")
    # rollouts and reward
    parser.add_argument("--iterations", type=nonneg_int, help="rollout-then-update iterations (0: judge the SFT policy)")
    parser.add_argument("--rollout_batch", type=positive_int, help="prompts (one response each) per iteration")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, used in "
                        "every log-prob")
    parser.add_argument("--max_new_tokens", type=positive_int, default=96, help="longest response")
    parser.add_argument("--beta", type=nonneg_float, default=0.15, help="KL penalty coefficient (InstructGPT: 0.02, "
                        "on another reward scale; at 0.05 ours drifts to ~3 nats and games the RM, see README)")
    parser.add_argument("--kl_target", type=nonneg_float, default=0.0, help="adaptive KL controller target in nats "
                        "per response (Ziegler et al. 2019); 0: fixed beta")
    parser.add_argument("--rule_coef", type=nonneg_float, default=1.0, help="weight of the rule model's violation "
                        "probabilities")
    parser.add_argument("--missing_end_penalty", type=nonneg_float, default=1.0, help="subtracted when a response "
                        "never ends")
    # PPO
    parser.add_argument("--ppo_epochs", type=positive_int, help="passes over each rollout batch")
    parser.add_argument("--minibatch", type=positive_int, help="responses per PPO minibatch")
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
    parser.add_argument("--ptx_batch", type=positive_int, default=4, help="generic-text sequences per ptx minibatch")
    # evaluation
    parser.add_argument("--n_eval", type=positive_int, help="held-out prompts for the final evaluation")
    parser.add_argument("--eval_samples", type=positive_int, default=4, help="samples per held-out prompt in the "
                        "evaluation")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--seed", type=int, default=1337, help="seeds prompts, sampling and minibatches")
    args = parse_args(parser, PRESETS)

    # -----------------------------------------------------------------------------
    # device, dtype
    device, autocast = setup_device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    torch.manual_seed(args.seed)

    # -----------------------------------------------------------------------------
    # data: held-in prompts (the training distribution), generic text for ptx and its eval
    enc = load_tokenizer(args.tokenizer)
    pad_id, end_id = enc.encode_single_token(EOT), enc.encode_single_token(END)
    prompt_pool = prompt_set("ppo_train", args.iterations * args.rollout_batch, args.seed)
    generic_train, generic_val = load_tokens(args.generic_data, "train", enc), load_tokens(args.generic_data, "val", enc)

    # -----------------------------------------------------------------------------
    # models: all four with dropout off (it would make old and new log-probs disagree)
    sft_ckpt = load_checkpoint(args.sft, ["sft"], enc, device)
    reward_ckpt = load_checkpoint(os.path.join(args.reward_dir, "reward.pt"), ["reward"], enc, device)
    rules_ckpt = load_checkpoint(os.path.join(args.reward_dir, "rules.pt"), ["rules"], enc, device)
    # a finished checkpoint resumes at its last iteration: the loop ends at once and the evaluation runs
    resume = load_checkpoint(ckpt_path, ["ppo"], enc, device) if os.path.exists(ckpt_path) else None
    policy = model_from_checkpoint(resume or sft_ckpt, device, dropout=0.0)
    reference = model_from_checkpoint(sft_ckpt, device, dropout=0.0).requires_grad_(False)
    value_model = model_from_checkpoint(reward_ckpt, device, dropout=0.0)  # InstructGPT: value from the RM
    if resume is not None:
        value_model.load_state_dict(resume["value_model"])
    reward_model = model_from_checkpoint(reward_ckpt, device, dropout=0.0).requires_grad_(False)
    rule_model = model_from_checkpoint(rules_ckpt, device, dropout=0.0).requires_grad_(False)
    for m in (policy, reference, value_model, reward_model, rule_model):
        m.eval()  # eval mode throughout: no dropout anywhere, old and new log-probs come out equal

    # -----------------------------------------------------------------------------
    # optimizers
    policy_opt = policy.configure_optimizers(args.lr, 0.0, (0.9, 0.95), device.type)
    value_opt = value_model.configure_optimizers(args.lr * args.value_lr_ratio, 0.0, (0.9, 0.95), device.type)
    start, beta = 0, args.beta
    if resume is not None:
        policy_opt.load_state_dict(resume["policy_opt"])
        value_opt.load_state_dict(resume["value_opt"])
        start, beta = resume["iteration"], resume["beta"]
        trim_log(log_path, "iteration", start)
        print(f"resuming {ckpt_path} at iteration {start}")
    sample_rng = torch.Generator().manual_seed(args.seed + start)
    ptx_rng = torch.Generator().manual_seed(args.seed + PTX_SEED + start)
    shuffle_rng = random.Random(args.seed + start)

    # -----------------------------------------------------------------------------
    # evaluation helpers
    @torch.no_grad()
    def generic_val_loss(model):
        """Loss on generic validation text (fixed windows): what PPO-ptx is meant to protect."""
        rng = torch.Generator().manual_seed(GENERIC_VAL_SEED)
        losses = []
        for _ in range(GENERIC_VAL_BATCHES):
            x, y = get_batch(generic_val, GENERIC_VAL_BATCH_SIZE, model.config.block_size, rng, device)
            with autocast:
                losses.append(model(x, y)[1].item())
        return fmean(losses)

    @torch.no_grad()
    def kl_to_reference(prompts, samples):
        """KL(policy || SFT) per response, estimated on the policy's own samples: the mean over
        samples of the summed log-ratio (the k1 estimator)."""
        kls = []
        for start in range(0, len(samples), SCORE_BATCH):
            chunk = slice(start, start + SCORE_BATCH)
            x, targets, mask = pack_rollouts(prompts[chunk], [s["tokens"] for s in samples[chunk]], pad_id, device)
            with autocast:
                lp, _ = policy_logprobs(policy, x, targets, args.temperature)
                ref_lp, _ = policy_logprobs(reference, x, targets, args.temperature)
            kls += ((lp - ref_lp) * mask).sum(1).tolist()
        return fmean(kls)

    def save(iteration, finished):
        save_checkpoint(ckpt_path, policy, "ppo", enc, value_model=value_model.state_dict(),
                        policy_opt=policy_opt.state_dict(), value_opt=value_opt.state_dict(), iteration=iteration,
                        beta=beta, finished=finished, config=vars(args), generic_before=generic_before,
                        seconds=t_phase)

    # -----------------------------------------------------------------------------
    # the loop
    generic_before = generic_val_loss(policy) if resume is None else resume["generic_before"]
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
        t0 = time.perf_counter()
        tasks = prompt_pool[it * args.rollout_batch:(it + 1) * args.rollout_batch]
        prompts = [encode_chat(enc, t.prompt)[0] for t in tasks]
        with torch.no_grad(), autocast:
            tokens, _, lengths, _ = policy.generate(prompts, args.max_new_tokens, args.temperature, eos_id=end_id,
                                                    pad_id=pad_id, generator=sample_rng)
        responses = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
        ended = torch.tensor([r[-1] == end_id for r in responses], dtype=torch.float, device=device)
        x, targets, mask = pack_rollouts(prompts, responses, pad_id, device)
        t1 = time.perf_counter()

        # ---------------- SCORING ----------------
        # old log-probs and values come from a fresh forward in exactly the layout of the update's
        # first minibatches, not from sampling: so the first ratio is exactly 1
        B = len(prompts)
        order = shuffle_rng.sample(range(B), B)
        old_logprobs, ref_logprobs = torch.zeros_like(mask), torch.zeros_like(mask)
        old_values = torch.zeros_like(mask)
        with torch.no_grad():
            for mb in range(0, B, args.minibatch):
                idx = torch.tensor(order[mb:mb + args.minibatch], device=device)
                with autocast:
                    old_logprobs[idx] = policy_logprobs(policy, x[idx], targets[idx], args.temperature)[0]
                    ref_logprobs[idx] = policy_logprobs(reference, x[idx], targets[idx], args.temperature)[0]
                    old_values[idx] = value_model.scores(x[idx])[..., 0].float()
            seqs = [p + r for p, r in zip(prompts, responses)]
            # the RM reads the last token of prompt + response, the position it was trained on
            with autocast:
                rm_score = reward_model.last_token_scores(seqs, pad_id)[:, 0]
                rule_probs = torch.sigmoid(rule_model.last_token_scores(seqs, pad_id))  # (B, n_rules)
        score = sequence_score(rm_score, rule_probs, ended, args.rule_coef, args.missing_end_penalty)
        rewards, log_ratio = shaped_rewards(score, old_logprobs, ref_logprobs, mask, beta)
        advantages, returns = compute_gae(rewards, old_values * mask, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)
        t2 = time.perf_counter()

        # ---------------- UPDATE ----------------
        stats = dict(pg_loss=[], vf_loss=[], clip_frac=[], approx_kl=[], entropy=[], ptx_loss=[], ratio_dev=[])
        for epoch in range(args.ppo_epochs):
            if epoch > 0:
                order = shuffle_rng.sample(range(B), B)
            for mb in range(0, B, args.minibatch):
                idx = torch.tensor(order[mb:mb + args.minibatch], device=device)
                m = mask[idx]
                with autocast:
                    logprobs, entropy = policy_logprobs(policy, x[idx], targets[idx], args.temperature)
                    values = value_model.scores(x[idx])[..., 0].float()
                pg_loss, clip_frac = ppo_policy_loss(logprobs, old_logprobs[idx], advantages[idx], m, args.clip)
                vf_loss = ppo_value_loss(values, old_values[idx], returns[idx], m, args.value_clip)
                policy_loss = pg_loss
                if args.ptx_coef > 0:  # PPO-ptx: + gamma * E_pretrain[log pi(x)] (InstructGPT, eq. 2)
                    px, py = get_batch(generic_train, args.ptx_batch, policy.config.block_size, ptx_rng, device)
                    with autocast:
                        ptx_loss = policy(px, py)[1]
                    policy_loss = policy_loss + args.ptx_coef * ptx_loss
                    stats["ptx_loss"].append(ptx_loss.item())
                (policy_loss + vf_loss).backward()  # separate models: each gets its own loss's gradient
                clip_and_step(policy, policy_opt, args.lr, args.grad_clip)  # a constant learning rate
                clip_and_step(value_model, value_opt, args.lr * args.value_lr_ratio, args.grad_clip)
                with torch.no_grad():
                    log_r = (logprobs - old_logprobs[idx]) * m
                    stats["approx_kl"].append(masked_mean(torch.exp(log_r) - 1 - log_r, m).item())  # k3 estimator
                stats["ratio_dev"].append(((torch.exp(log_r) - 1).abs() * m).max().item())
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["clip_frac"].append(clip_frac.item())
                stats["entropy"].append(masked_mean(entropy.detach(), m).item())
        t3 = time.perf_counter()
        for phase, dt in zip(t_phase, (t1 - t0, t2 - t1, t3 - t2)):
            t_phase[phase] += dt

        # ---------------- LOGGING ----------------
        kl = log_ratio.sum(1).mean().item()  # nats per response, KL(policy || SFT) on this batch
        flat_returns, flat_values = returns[mask.bool()], old_values[mask.bool()]
        explained_var = 1 - torch.var(flat_returns - flat_values) / torch.var(flat_returns).clamp(min=1e-8)
        row = dict(iteration=it, score=score.mean().item(), rm_score=rm_score.mean().item(),
                   rule_prob=rule_probs.sum(1).mean().item(), kl=kl, beta=beta, ended=ended.mean().item(),
                   response_len=mask.sum(1).mean().item(), explained_var=explained_var.item(),
                   first_ratio_dev=stats["ratio_dev"][0], **{k: fmean(v) for k, v in stats.items() if v and k != "ratio_dev"},
                   ms_rollout=(t1 - t0) * 1000, ms_score=(t2 - t1) * 1000, ms_update=(t3 - t2) * 1000)
        log_metrics(log_path, **row)
        tqdm.write(f"iter {it:4d}/{args.iterations} | score {row['score']:+.3f} | rm {row['rm_score']:+.3f} | "
                   f"kl {kl:6.3f} | beta {beta:.3f} | ent {row['entropy']:.3f} | clip {row['clip_frac']:.3f} | "
                   f"vf {row['vf_loss']:.4f} | ev {row['explained_var']:+.2f} | len {row['response_len']:5.1f} | "
                   f"{(t3 - t0):5.1f} s")
        if args.kl_target > 0:
            beta = adaptive_beta(beta, kl, args.kl_target)

    # -----------------------------------------------------------------------------
    # the final summary: the gold judge on held-out prompts
    eval_tasks = prompt_set("eval", args.n_eval, args.seed)
    n = args.eval_samples
    with autocast:
        ours, samples = evaluate_policy(policy, enc, eval_tasks, n, args.temperature, args.max_new_tokens, args.seed)
        sft, _ = evaluate_policy(reference, enc, eval_tasks, n, args.temperature, args.max_new_tokens, args.seed)
        train_split = evaluate_policy(policy, enc, prompt_set("eval_train", args.n_eval, args.seed),
                                      max_new_tokens=args.max_new_tokens)[0]
    # the noiseless labeler prefers the higher gold utility, sample against sample; a tie counts half
    win_rate = fmean(1.0 if a > b else 0.5 if a == b else 0.0
                    for a, b in zip(ours["sampled"]["utilities"], sft["sampled"]["utilities"]))
    kl = kl_to_reference([encode_chat(enc, t.prompt)[0] for t in eval_tasks for _ in range(n)], samples)
    summary = dict(heldout_comp=ours, sft_heldout_comp=sft, win_rate_vs_sft=win_rate, kl_to_sft=kl,
                   train_split=train_split,
                   generic_val_loss_before=generic_before, generic_val_loss_after=generic_val_loss(policy),
                   ptx_coef=args.ptx_coef, seconds=t_phase, iterations=args.iterations,
                   episodes=args.iterations * args.rollout_batch)
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    h = summary["heldout_comp"]["sampled"]
    print(f"held-out samples: win rate vs SFT {win_rate:.1%} | pass@1 {h['pass1']:.1%} | utility {h['utility']:+.3f} | "
          f"violations {h['violation_rate']:.1%} | KL to SFT {kl:.2f} nats | generic val loss {generic_before:.4f} -> "
          f"{summary['generic_val_loss_after']:.4f}")
