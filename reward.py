"""
Stage 4: reward models from simulated human judgments, and best-of-n reranking.

1. Comparisons (InstructGPT, Ouyang et al. 2022, sec. 3.5): for each training prompt the SFT
   model writes K responses; a simulated labeler ranks them by the hidden utility plus noise,
   which gives K-choose-2 comparisons; simulated probers label each response against each written
   rule (Sparrow, Glaese et al. 2022).
2. The preference reward model: the SFT trunk with its unembedding replaced by a scalar head,
   read at the response's last token, trained with the pairwise loss
       loss = -E[ log sigmoid(r(x, y_w) - r(x, y_l)) ]            (InstructGPT, eq. 1)
   with all K-choose-2 comparisons of a prompt in one batch, so each response takes one forward
   pass (InstructGPT's reason: K-choose-2 comparisons for the cost of K, and no overfitting from
   seeing one response in many separate batches). Afterwards a bias makes the SFT model's
   responses score 0 on average (InstructGPT normalizes its RM the same way before RL).
3. The rule model: the same trunk with one logit per rule, binary cross-entropy on the probers'
   labels (Sparrow's rule RM).
4. Best-of-n: sample n responses, drop those the rule model flags, keep the one with the highest
   preference score (Sparrow's reranking, LaMDA's filtering), and ask the gold judge how good
   that pick really is as n grows (Gao et al. 2022: the proxy keeps rising, the gold does not).

    python reward.py                   # cpu preset, from out/sft/ckpt.pt
    python reward.py --preset gpu --sft out_gpu/sft/ckpt.pt --out_dir out_gpu/reward

The comparisons are cached in out_dir/comparisons.json, so a rerun trains again without sampling
and labelling again. Both models train in one short loop; an interrupted run restarts the loop.
"""
import argparse
import itertools
import json
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import EOT, encode_chat, load_tokenizer
from model import GPT, GPTConfig, load_checkpoint, model_from_checkpoint, save_checkpoint
from pretrain import apply_preset, configure_optimizer, cosine_lr, log_metrics, setup_device
from sft import mean, sample_responses
from tasks import RULES, gold_eval_many, labeler_agreement, labeler_rank, make_tasks, probe_rules

PRESETS = {
    "quick": dict(n_prompts=48, epochs=1, lr=1e-3, n_eval=16, best_of=(1, 2, 4)),
    "cpu": dict(n_prompts=1000, epochs=2, lr=3e-4, n_eval=150, best_of=(1, 2, 4, 8, 16)),
    "gpu": dict(n_prompts=8000, epochs=2, lr=1e-4, n_eval=500, best_of=(1, 2, 4, 8, 16, 32, 64)),
}


def pairwise_loss(rewards, ranking):
    """InstructGPT's eq. 1 for one prompt: rewards (K,) of its responses, ranking the indices best
    first; the mean of -log sigmoid(r_w - r_l) over all K-choose-2 ordered pairs."""
    pairs = list(itertools.combinations(ranking, 2))  # (winner, loser): earlier in the ranking wins
    winners = torch.tensor([w for w, _ in pairs], device=rewards.device)
    losers = torch.tensor([l for _, l in pairs], device=rewards.device)
    return -F.logsigmoid(rewards[winners] - rewards[losers]).mean()


def with_score_head(ckpt, n_scores, device):
    """A GPT from a policy checkpoint with its scalar head added (zero-initialized, so every
    response starts at score 0): the trunk of a reward, rule or value model."""
    model = GPT(GPTConfig(**{**ckpt["model_args"], "n_scores": n_scores}))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    assert sorted(missing) == ["score_head.bias", "score_head.weight"] and not unexpected, (missing, unexpected)
    nn.init.zeros_(model.score_head.weight)
    nn.init.zeros_(model.score_head.bias)
    return model.to(device)


def last_token_scores(model, sequences, pad_id, device, autocast):
    """The scalar head at each sequence's last token, (N, n_scores): where a reward model reads
    its verdict on a whole response (InstructGPT: the final token's output). Right padding never
    reaches that position through causal attention."""
    T = max(len(s) for s in sequences)
    x = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, :len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in sequences], device=device)
    with autocast:
        scores = model.scores(x.to(device))  # (N, T, n_scores)
    return scores[torch.arange(len(sequences), device=device), last]


def build_comparisons(policy, enc, tasks, k, autocast, seed, labeler_seed, prober_noise):
    """K samples per prompt from the policy, the gold judge's verdicts, one simulated labeler's
    ranking and the probers' rule labels. Returns one record per prompt."""
    prompts = [encode_chat(enc, t.prompt)[0] for t in tasks]
    samples = sample_responses(policy, enc, prompts, k, 1.0, 96, autocast, torch.Generator().manual_seed(seed))
    evals = gold_eval_many([t for t in tasks for _ in range(k)], [s["text"] for s in samples])
    rng = random.Random(labeler_seed)
    records = []
    for i, prompt in enumerate(prompts):
        group = range(i * k, (i + 1) * k)
        utilities = [evals[j]["utility"] for j in group]
        records.append(dict(
            sequences=[prompt + samples[j]["tokens"] for j in group], texts=[samples[j]["text"] for j in group],
            utilities=utilities, passed=[evals[j]["passed"] for j in group], ranking=labeler_rank(utilities, rng),
            rule_labels=[list(probe_rules(samples[j]["text"], rng, prober_noise).values()) for j in group],
            gold_rules=[[evals[j]["violations"][r] for r in RULES] for j in group]))
    return records


def pair_accuracy(scores, records, key):
    """Share of the pairs whose gold utilities differ that the scores order as `key` does:
    'ranking', the labeler's noisy order (its ceiling is the labelers' own agreement with the
    gold), or 'utilities', the noiseless gold order."""
    right = total = 0
    for s, r in zip(scores, records):
        for i, j in itertools.combinations(range(len(s)), 2):
            if r["utilities"][i] == r["utilities"][j]:
                continue  # a tie: the labeler's order is a coin flip, the gold has none
            if key == "ranking":
                better = r["ranking"].index(i) < r["ranking"].index(j)
            else:
                better = r["utilities"][i] > r["utilities"][j]
            total += 1
            right += (s[i] > s[j]) == better
    return right / max(1, total)


def best_of_n(samples_scores, rule_probs, n, threshold=0.5):
    """For each prompt, among its first n samples: drop those the rule model flags (any rule with
    probability above threshold; keep all if all are flagged), then pick the highest preference
    score. Returns (picked indices, their proxy scores)."""
    picks = []
    for group_scores, group_rules in zip(samples_scores, rule_probs):
        candidates = [j for j in range(n) if max(group_rules[j]) <= threshold] or list(range(n))
        picks.append(max(candidates, key=lambda j: group_scores[j]))
    return picks


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--sft", default="out/sft/ckpt.pt", help="the SFT checkpoint: samples and both trunks")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/reward", help="models, comparisons, log and summary go here")
    # data
    parser.add_argument("--n_prompts", type=int, default=None, help="training prompts to sample and label")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt, ranked together (InstructGPT: 4-9)")
    parser.add_argument("--prober_noise", type=float, default=0.05, help="chance a prober flips a rule label")
    parser.add_argument("--val_share", type=float, default=0.1, help="share of prompts held out for accuracy")
    # optimization
    parser.add_argument("--epochs", type=int, default=None, help="passes over the comparisons")
    parser.add_argument("--prompts_per_step", type=int, default=8, help="prompts (each K responses) per step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    # evaluation
    parser.add_argument("--n_eval", type=int, default=None, help="held-out prompts for best-of-n")
    parser.add_argument("--best_of", type=int, nargs="+", default=None, help="values of n for best-of-n")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--seed", type=int, default=1337, help="seeds prompts, samples and labelers")
    args = apply_preset(parser.parse_args(), PRESETS)

    # -----------------------------------------------------------------------------
    # device, dtype
    device, autocast = setup_device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "log.jsonl")
    torch.manual_seed(args.seed)

    # -----------------------------------------------------------------------------
    # data: sample, judge, rank and probe (cached)
    enc = load_tokenizer(args.tokenizer)
    pad_id = enc.encode_single_token(EOT)
    sft_ckpt = load_checkpoint(args.sft, ["sft"], enc, device)
    policy = model_from_checkpoint(sft_ckpt, device)
    cache = os.path.join(args.out_dir, "comparisons.json")
    if os.path.exists(cache):
        with open(cache) as f:
            records, data_seconds = json.load(f), None
        print(f"loaded {len(records)} prompts of comparisons from {cache}")
    else:
        t0 = time.time()
        records = build_comparisons(policy, enc, make_tasks("train", args.n_prompts, args.seed + 10), args.k,
                                    autocast, args.seed, args.seed + 11, args.prober_noise)
        data_seconds = time.time() - t0
        with open(f"{cache}.tmp", "w") as f:
            json.dump(records, f)
        os.replace(f"{cache}.tmp", cache)
    n_val = max(1, int(len(records) * args.val_share))
    train_records, val_records = records[n_val:], records[:n_val]
    agreement = labeler_agreement([r["utilities"] for r in records], random.Random(args.seed + 12))
    print(f"data: {len(train_records)} train / {len(val_records)} held-out prompts, K={args.k}: "
          f"{len(train_records) * args.k * (args.k - 1) // 2} train comparisons; labelers agree with the gold "
          f"utility on {agreement:.1%} of non-tied pairs")

    # -----------------------------------------------------------------------------
    # models: both trunks start as the SFT model
    reward_model = with_score_head(sft_ckpt, 1, device)
    rule_model = with_score_head(sft_ckpt, len(RULES), device)

    # -----------------------------------------------------------------------------
    # optimizers
    reward_opt = configure_optimizer(reward_model, args.lr, 0.0, (0.9, 0.95), device)
    rule_opt = configure_optimizer(rule_model, args.lr, 0.0, (0.9, 0.95), device)

    # -----------------------------------------------------------------------------
    # evaluation helpers
    @torch.no_grad()
    def score_records(recs):
        """Preference scores (per prompt, per response) and rule probabilities."""
        reward_model.eval(), rule_model.eval()
        seqs = [s for r in recs for s in r["sequences"]]
        rewards, rule_probs = [], []
        for start in range(0, len(seqs), 64):
            rewards += last_token_scores(reward_model, seqs[start:start + 64], pad_id, device, autocast)[:, 0].tolist()
            rule_probs += torch.sigmoid(last_token_scores(rule_model, seqs[start:start + 64], pad_id, device,
                                                          autocast)).tolist()
        reward_model.train(), rule_model.train()
        k = len(recs[0]["sequences"])
        return [rewards[i:i + k] for i in range(0, len(rewards), k)], [rule_probs[i:i + k] for i in range(0, len(rule_probs), k)]

    def rule_accuracy(rule_probs, recs):
        """Per rule: accuracy of the rule model against the gold checker (not the noisy probers)."""
        flat_p = [p for group in rule_probs for p in group]
        flat_gold = [g for r in recs for g in r["gold_rules"]]
        return {rule: mean((p[i] > 0.5) == g[i] for p, g in zip(flat_p, flat_gold)) for i, rule in enumerate(RULES)}

    # -----------------------------------------------------------------------------
    # the loop: both models see the same prompts, K responses each, one forward pass per response
    steps_per_epoch = len(train_records) // args.prompts_per_step
    max_steps = steps_per_epoch * args.epochs
    order_rng = random.Random(args.seed)
    order = []
    t0 = time.time()
    reward_model.train(), rule_model.train()
    for step in tqdm(range(max_steps + 1), desc="reward", dynamic_ncols=True):
        last_step = step == max_steps
        if step % max(1, steps_per_epoch // 2) == 0 or last_step:
            val_scores, val_rules = score_records(val_records)
            metrics = dict(step=step, val_acc_labeler=pair_accuracy(val_scores, val_records, "ranking"),
                           val_acc_gold=pair_accuracy(val_scores, val_records, "utilities"),
                           val_rule_acc=rule_accuracy(val_rules, val_records))
            log_metrics(log_path, **metrics)
            tqdm.write(f"step {step:4d}/{max_steps} | held-out pair accuracy vs labelers {metrics['val_acc_labeler']:.3f}"
                       f" | vs gold {metrics['val_acc_gold']:.3f} | rule accuracy "
                       + " ".join(f"{v:.3f}" for v in metrics["val_rule_acc"].values()))
        if last_step:
            break

        # ---------------- TRAINING SECTION ----------------
        if len(order) < args.prompts_per_step:  # a new epoch, in a new order
            order = order_rng.sample(range(len(train_records)), len(train_records))
        batch = [train_records[order.pop()] for _ in range(args.prompts_per_step)]
        seqs = [s for r in batch for s in r["sequences"]]
        rewards = last_token_scores(reward_model, seqs, pad_id, device, autocast)[:, 0].view(len(batch), args.k)
        # one forward per response, every comparison of a prompt from the same K rewards (InstructGPT)
        pref_loss = torch.stack([pairwise_loss(rewards[i], r["ranking"]) for i, r in enumerate(batch)]).mean()
        rule_logits = last_token_scores(rule_model, seqs, pad_id, device, autocast)  # (B*K, n_rules)
        labels = torch.tensor([lab for r in batch for lab in r["rule_labels"]], dtype=torch.float, device=device)
        rule_loss = F.binary_cross_entropy_with_logits(rule_logits, labels)
        (pref_loss + rule_loss).backward()  # two separate models: each gets only its own loss's gradient
        lr = cosine_lr(step, args.lr, max(1, max_steps // 20), max_steps)
        for model, opt in ((reward_model, reward_opt), (rule_model, rule_opt)):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            log_metrics(log_path, step=step, pref_loss=pref_loss.item(), rule_loss=rule_loss.item(), lr=lr)
            tqdm.write(f"step {step:4d}/{max_steps} | pairwise loss {pref_loss.item():.4f} | "
                       f"rule loss {rule_loss.item():.4f} | lr {lr:.1e}")
    train_seconds = time.time() - t0

    # normalize: the SFT model's responses (the training samples) score 0 on average (InstructGPT)
    train_scores, _ = score_records(train_records)
    offset = mean(s for group in train_scores for s in group)
    with torch.no_grad():
        reward_model.score_head.bias -= offset
    save_checkpoint(os.path.join(args.out_dir, "reward.pt"), reward_model, "reward", enc, config=vars(args),
                    normalization=offset)
    save_checkpoint(os.path.join(args.out_dir, "rules.pt"), rule_model, "rules", enc, config=vars(args),
                    rules=list(RULES))

    # -----------------------------------------------------------------------------
    # the final summary: accuracies, then best-of-n judged by the gold judge
    val_scores, val_rules = score_records(val_records)
    eval_tasks = make_tasks("heldout_comp", args.n_eval, args.seed + 2)
    n_max = max(args.best_of)
    t0 = time.time()
    eval_records = build_comparisons(policy, enc, eval_tasks, n_max, autocast, args.seed + 20, args.seed + 21,
                                     args.prober_noise)
    scores, rule_probs = score_records(eval_records)
    rows = []
    for n in args.best_of:
        picks = best_of_n(scores, rule_probs, n)
        chosen = [(r, j) for r, j in zip(eval_records, picks)]  # the gold verdicts came with the samples
        rows.append(dict(n=n, proxy_reward=mean(s[j] for s, j in zip(scores, picks)),
                         gold_utility=mean(r["utilities"][j] for r, j in chosen), pass1=mean(r["passed"][j] for r, j in chosen),
                         violation_rate=mean(any(r["gold_rules"][j]) for r, j in chosen)))
        print(f"best-of-{n:<3d}: proxy reward {rows[-1]['proxy_reward']:+.3f} | gold utility "
              f"{rows[-1]['gold_utility']:+.3f} | pass@1 {rows[-1]['pass1']:.1%} | violations {rows[-1]['violation_rate']:.1%}")
    summary = dict(labeler_agreement=agreement, val_acc_labeler=pair_accuracy(val_scores, val_records, "ranking"),
                   val_acc_gold=pair_accuracy(val_scores, val_records, "utilities"),
                   val_rule_acc=rule_accuracy(val_rules, val_records), normalization=offset,
                   n_train_prompts=len(train_records), n_val_prompts=len(val_records), k=args.k,
                   data_seconds=data_seconds, rollouts_per_s=len(records) * args.k / data_seconds if data_seconds else None,
                   train_seconds=train_seconds, best_of_n=rows, best_of_n_seconds=time.time() - t0)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"reward model: held-out pair accuracy {summary['val_acc_labeler']:.1%} vs labelers, "
          f"{summary['val_acc_gold']:.1%} vs gold; labelers agree with gold on {agreement:.1%}")
