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
   seeing one response in many separate batches), for one epoch (InstructGPT: more overfits).
   Afterwards a bias makes the demonstrators' answers to the training prompts score 0 on average,
   as InstructGPT normalized its RM on the labelers' demonstrations before RL.
3. The rule model: the same trunk with one logit per rule, binary cross-entropy on the probers'
   labels (Sparrow's rule RM).
4. Best-of-n: of the SFT model's samples for each test prompt (sft.py wrote them, with the gold
   judge's verdicts: the very samples of the report's SFT row), drop those the rule model flags,
   keep the one with the highest preference score (Sparrow's reranking, LaMDA's filtering), and
   ask the gold judge how good that pick is as n grows (Gao et al. 2022: the proxy keeps rising,
   the gold does not).

    python reward.py                   # cpu preset, from out/sft/ckpt.pt
    python reward.py --preset gpu --sft out_gpu/sft/ckpt.pt --out_dir out_gpu/reward
    python reward.py --pairs examples/pairs.jsonl --sft out/sft_mine/ckpt.pt --out_dir out/reward_mine  # your pairs

The comparisons are cached in out_dir/comparisons.json, so a rerun trains again without sampling
and labelling again. Both models train in one short loop; an interrupted run restarts the loop.
"""
import argparse
import itertools
import json
import os
import random
import time
from statistics import fmean

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (HelpFormatter, check_finite, cosine_lr, follow_core_share, fraction, log_metrics, nonneg_float,
                    parse_args, positive_float, positive_int, print0, setup_device, setup_distributed, write_json)
from data import EOT, encode_conversation, fit_block, load_tokenizer, read_pairs, split_held_out
from model import last_token_scores, load_checkpoint, model_from_checkpoint, save_checkpoint, with_score_head
from judge import best_of_n, gold_eval_many, sample_responses
from tasks import RULES, demonstrate, encode_task, labeler_agreement, labeler_rank, probe_rules, prompt_set

PRESETS = {
    "quick": dict(n_prompts=48, lr=1e-3, best_of=(1, 2, 4)),
    "cpu": dict(n_prompts=1000, lr=3e-4, best_of=(1, 2, 4, 8, 16)),
    "gpu": dict(n_prompts=8000, lr=1e-4, best_of=(1, 2, 4, 8, 16, 32, 64)),
}
# seeds of the simulated humans and of sampling, as offsets from --seed
SAMPLE_SEED, LABELER_SEED, AGREEMENT_SEED, DEMO_SEED = 0, 11, 12, 13
SCORE_BATCH = 64  # sequences per forward pass when scoring


def pairwise_loss(rewards, ranking):
    """InstructGPT's eq. 1 for one prompt: rewards (K,) of its responses, ranking the indices best
    first; the mean of -log sigmoid(r_w - r_l) over all K-choose-2 ordered pairs."""
    pairs = list(itertools.combinations(ranking, 2))  # (winner, loser): earlier in the ranking wins
    winners = torch.tensor([w for w, _ in pairs], device=rewards.device)
    losers = torch.tensor([l for _, l in pairs], device=rewards.device)
    return -F.logsigmoid(rewards[winners] - rewards[losers]).mean()


def build_comparisons(policy, enc, tasks, k, seed, labeler_seed, prober_noise, max_new_tokens):
    """K samples per prompt from the policy, the gold judge's verdicts, one simulated labeler's
    ranking and the probers' rule labels. Returns one record per prompt."""
    prompts = [encode_task(enc, t)[0] for t in tasks]
    samples = sample_responses(policy, enc, prompts, k, 1.0, max_new_tokens, torch.Generator().manual_seed(seed))
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


def pair_outcomes(scores, records, key):
    """For each pair whose gold utilities differ, (its prompt's index, whether the scores order it
    as `key` does): 'ranking', the labeler's noisy order (its ceiling is the labelers' own agreement
    with the gold), or 'utilities', the noiseless gold order."""
    out = []
    for p, (s, r) in enumerate(zip(scores, records)):
        for i, j in itertools.combinations(range(len(s)), 2):
            if "utilities" in r and r["utilities"][i] == r["utilities"][j]:  # (your own pairs have none)
                continue  # a tie: the labeler's order is a coin flip, the gold has none
            if key == "ranking":
                better = r["ranking"].index(i) < r["ranking"].index(j)
            else:
                better = r["utilities"][i] > r["utilities"][j]
            out.append((p, float((s[i] > s[j]) == better)))
    return out


def pair_accuracy(scores, records, key):
    return fmean(right for _, right in pair_outcomes(scores, records, key))


@torch.no_grad()
def normalize_reward(reward_model, sequences, pad_id, autocast):
    """Shift the reward model's head so that these sequences (prompt + a demonstrator's answer)
    score 0 on average, as InstructGPT normalized its RM on the labelers' demonstrations. Returns
    the shift, which is subtracted from the bias."""
    reward_model.eval()
    scores = []
    for start in range(0, len(sequences), SCORE_BATCH):
        with autocast:
            scores += last_token_scores(reward_model, sequences[start:start + SCORE_BATCH], pad_id)[:, 0].tolist()
    offset = fmean(scores)
    reward_model.score_head.bias -= offset
    return offset


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--sft", default="out/sft/ckpt.pt", help="the SFT checkpoint: samples and both trunks")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/reward", help="models, comparisons, log and summary go here")
    # data
    parser.add_argument("--pairs", default=None, help="your own preference pairs instead of the world's comparisons: "
                        "JSON Lines of {prompt, chosen, rejected} (data.read_pairs); no rule labels, so no rule model")
    parser.add_argument("--n_prompts", type=positive_int, help="training prompts to sample and label")
    parser.add_argument("--k", type=positive_int, default=4, help="responses per prompt, ranked together "
                        "(InstructGPT: 4-9)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=96, help="longest sampled response")
    parser.add_argument("--prober_noise", type=fraction, default=0.05, help="chance a prober flips a rule label")
    parser.add_argument("--val_share", type=fraction, default=0.1, help="share of prompts held out for accuracy "
                        "(--pairs: every round(1 / share)-th pair)")
    # optimization
    parser.add_argument("--epochs", type=positive_int, default=1, help="passes over the comparisons (InstructGPT: "
                        "1; a second overfits)")
    parser.add_argument("--prompts_per_step", type=positive_int, default=8, help="prompts (each K responses) per step")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate")
    parser.add_argument("--warmup_share", type=fraction, default=0.05, help="share of the steps spent warming up")
    parser.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="clip the gradient norm (0: off)")
    # evaluation and logging
    parser.add_argument("--evals_per_epoch", type=positive_int, default=2, help="held-out accuracy runs per epoch")
    parser.add_argument("--log_interval", type=positive_int, default=10, help="steps between log lines")
    parser.add_argument("--best_of", type=positive_int, nargs="+", help="values of n for best-of-n, doubling from 1; "
                        "the largest needs as many SFT samples per test prompt (sft.py --n_samples)")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="autocast: bf16 where "
                        "the device supports it (auto), or as asked (run.py --rehearse: bf16 on a CPU)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds prompts, samples and labelers")
    args = parse_args(parser, PRESETS)
    if args.best_of[0] != 1 or any(b != 2 * a for a, b in zip(args.best_of, args.best_of[1:])):
        parser.error(f"--best_of must double from 1 (1 2 4 ...), got {args.best_of}: the report compares each n "
                     f"with the one before")

    # -----------------------------------------------------------------------------
    # device, dtype, and under torchrun the ranks: rank 0 alone samples the comparisons, prints, logs,
    # evaluates and saves; every rank trains on its share of each step's prompts
    rank, world, device_name = setup_distributed(args.device)
    master = rank == 0
    device, autocast = setup_device(device_name, args.dtype)
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts_per_step {args.prompts_per_step} does not divide among {world} ranks")
    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "log.jsonl")
    torch.manual_seed(args.seed)

    # -----------------------------------------------------------------------------
    # data: sample, judge, rank and probe (cached); the sequences normalization makes score 0 on average
    enc = load_tokenizer(args.tokenizer)
    pad_id = enc.encode_single_token(EOT)
    sft_ckpt = load_checkpoint(args.sft, ["sft"], enc, device)
    if args.pairs:  # yours: a record per pair, K = 2 with the chosen first; those that fit, some held out; no
        # demonstrator (every response of the training pairs scores 0 on average) and no rule labels (no rule model)
        pairs = [[encode_conversation(enc, c)[0] for c in pair] for pair in read_pairs(args.pairs)]
        records = [dict(sequences=p, ranking=[0, 1]) for p in fit_block(
            pairs, [max(map(len, p)) for p in pairs], sft_ckpt["model_args"]["block_size"], args.pairs)]
        train_records, val_records = split_held_out(records, max(2, round(1 / args.val_share)) if args.val_share
                                                    else len(records))
        n_skipped, data_seconds, args.k = len(pairs) - len(records), None, 2
        normalize_on = [s for r in train_records for s in r["sequences"]]
        print0(f"data: {len(train_records)} train / {len(val_records)} held-out pairs of yours from {args.pairs} "
               f"({n_skipped} skipped); they carry no rule labels: the rule model is not trained")
    else:
        samples_path = os.path.join(os.path.dirname(args.sft), "samples_test.json")  # for best-of-n
        if not os.path.exists(samples_path):
            raise FileNotFoundError(f"{samples_path} not found: sft.py writes the SFT model's test samples at the "
                                    f"end of its run, and best-of-n reranks those very samples")
        policy = model_from_checkpoint(sft_ckpt, device)
        cache, data_seconds = os.path.join(args.out_dir, "comparisons.json"), None
        if master and not os.path.exists(cache):
            t0 = time.time()
            with autocast:
                records = build_comparisons(policy, enc, prompt_set("reward_train", args.n_prompts, args.seed),
                                            args.k, args.seed + SAMPLE_SEED, args.seed + LABELER_SEED,
                                            args.prober_noise, args.max_new_tokens)
            data_seconds = time.time() - t0
            write_json(cache, records)
        if world > 1:
            torch.distributed.barrier()  # the other ranks wait for rank 0's comparisons
        with open(cache) as f:
            records = json.load(f)
        print0(f"{len(records)} prompts of comparisons in {cache}" + ("" if data_seconds else " (from an earlier run)"))
        n_val, n_skipped = max(1, int(len(records) * args.val_share)), 0
        train_records, val_records = records[n_val:], records[:n_val]
        demo_rng = random.Random(args.seed + DEMO_SEED)  # InstructGPT: the demonstrators' answers score 0
        normalize_on = [encode_task(enc, t, demonstrate(t, demo_rng, sft_ckpt["config"]["flaw_rate"])[0])[0]
                        for t in prompt_set("reward_train", args.n_prompts, args.seed)]
        agreement = labeler_agreement([r["utilities"] for r in records], random.Random(args.seed + AGREEMENT_SEED))
        print0(f"data: {len(train_records)} train / {len(val_records)} held-out prompts, K={args.k}: "
               f"{len(train_records) * args.k * (args.k - 1) // 2} train comparisons; labelers agree with the gold "
               f"utility on {agreement:.1%} of non-tied pairs")

    # -----------------------------------------------------------------------------
    # models: both trunks start as the SFT model (your pairs: the reward model alone, without rule labels)
    reward_model = with_score_head(sft_ckpt, 1, device)
    rule_model = None if args.pairs else with_score_head(sft_ckpt, len(RULES), device)
    models = [m for m in (reward_model, rule_model) if m is not None]

    # -----------------------------------------------------------------------------
    # optimizers
    optimizers = [m.configure_optimizers(args.lr, 0.0, (0.9, 0.95), device.type) for m in models]

    # -----------------------------------------------------------------------------
    # evaluation helpers
    @torch.no_grad()
    def score_records(recs):
        """Preference scores and rule probabilities (none without a rule model), per prompt, per response."""
        for m in models:
            m.eval()
        seqs, k = [s for r in recs for s in r["sequences"]], len(recs[0]["sequences"])
        rewards, rule_probs = [], []
        for start in range(0, len(seqs), SCORE_BATCH):
            chunk = seqs[start:start + SCORE_BATCH]
            with autocast:
                rewards += last_token_scores(reward_model, chunk, pad_id)[:, 0].tolist()
                rule_probs += (torch.sigmoid(last_token_scores(rule_model, chunk, pad_id)).tolist() if rule_model
                               else [[]] * len(chunk))
        for m in models:
            m.train()
        return ([rewards[i:i + k] for i in range(0, len(rewards), k)],
                [rule_probs[i:i + k] for i in range(0, len(rule_probs), k)])

    def rule_accuracy(rule_probs, recs):
        """Per rule: accuracy of the rule model against the gold checker (not the noisy probers)."""
        flat_p = [p for group in rule_probs for p in group]
        flat_gold = [g for r in recs for g in r["gold_rules"]]
        return {rule: fmean((p[i] > 0.5) == g[i] for p, g in zip(flat_p, flat_gold)) for i, rule in enumerate(RULES)}

    # -----------------------------------------------------------------------------
    # the loop: both models see the same prompts, K responses each, one forward pass per response
    steps_per_epoch = len(train_records) // args.prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_records)} training prompts make no batch of --prompts_per_step "
                         f"{args.prompts_per_step}: raise --n_prompts")
    max_steps = steps_per_epoch * args.epochs
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    order_rng = random.Random(args.seed)
    order = []
    t0 = time.time()
    for m in models:
        m.train()
    # under torchrun each averages its gradients over the ranks in backward
    train_reward, train_rule = (m and DistributedDataParallel(m, broadcast_buffers=False) if world > 1 else m
                                for m in (reward_model, rule_model))
    for step in tqdm(range(max_steps + 1), desc="reward", dynamic_ncols=True, disable=not master):
        last_step = step == max_steps
        if master and (step % eval_every == 0 or last_step):
            val_scores, val_rules = score_records(val_records)
            metrics = dict(step=step, val_acc_labeler=pair_accuracy(val_scores, val_records, "ranking"))
            if not args.pairs:  # the world's judges: the noiseless gold order, the gold rule checker
                metrics.update(val_acc_gold=pair_accuracy(val_scores, val_records, "utilities"),
                               val_rule_acc=rule_accuracy(val_rules, val_records))
            log_metrics(log_path, **metrics)
            tqdm.write(f"step {step:4d}/{max_steps} | held-out pair accuracy vs "
                       f"{'your labels' if args.pairs else 'labelers'} {metrics['val_acc_labeler']:.3f}"
                       + ("" if args.pairs else f" | vs gold {metrics['val_acc_gold']:.3f} | rule accuracy "
                          + " ".join(f"{v:.3f}" for v in metrics["val_rule_acc"].values())))
        if last_step:
            break

        # ---------------- TRAINING SECTION ----------------
        follow_core_share()
        if len(order) < args.prompts_per_step:  # a new epoch, in a new order
            order = order_rng.sample(range(len(train_records)), len(train_records))
        batch = [train_records[order.pop()] for _ in range(args.prompts_per_step)][rank::world]  # this rank's share
        seqs = [s for r in batch for s in r["sequences"]]
        with autocast:
            rewards = last_token_scores(train_reward, seqs, pad_id)[:, 0].view(len(batch), args.k)
            rule_logits = last_token_scores(train_rule, seqs, pad_id) if rule_model else None  # (B*K, n_rules)
        # one forward per response, every comparison of a prompt from the same K rewards (InstructGPT)
        pref_loss = torch.stack([pairwise_loss(rewards[i], r["ranking"]) for i, r in enumerate(batch)]).mean()
        rule_loss = torch.zeros((), device=device)  # none without a rule model (your pairs carry no rule labels)
        if rule_model is not None:
            labels = torch.tensor([lab for r in batch for lab in r["rule_labels"]], dtype=torch.float, device=device)
            rule_loss = F.binary_cross_entropy_with_logits(rule_logits, labels)
        (pref_loss + rule_loss).backward()  # two separate models: each gets only its own loss's gradient
        lr_share = cosine_lr(step, max(1, int(max_steps * args.warmup_share)), max_steps)
        for m, optimizer in zip(models, optimizers):
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip or float("inf"))
            check_finite(norm)  # a diverged loss stops the run here, before the step spreads it into the weights
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_share
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if master and step % args.log_interval == 0:
            log_metrics(log_path, step=step, pref_loss=pref_loss.item(),
                        **({} if args.pairs else dict(rule_loss=rule_loss.item())), lr=args.lr * lr_share)
            tqdm.write(f"step {step:4d}/{max_steps} | pairwise loss {pref_loss.item():.4f} | "
                       + ("" if args.pairs else f"rule loss {rule_loss.item():.4f} | ") + f"lr {args.lr * lr_share:.1e}")
    train_seconds = time.time() - t0
    if world > 1:
        torch.distributed.destroy_process_group()
    if not master:
        raise SystemExit(0)
    offset = normalize_reward(reward_model, normalize_on, pad_id, autocast)
    save_checkpoint(os.path.join(args.out_dir, "reward.pt"), reward_model, "reward", enc, config=vars(args),
                    normalization=offset)
    rules_path = os.path.join(args.out_dir, "rules.pt")
    if rule_model is not None:
        save_checkpoint(rules_path, rule_model, "rules", enc, config=vars(args), rules=list(RULES))
    elif os.path.exists(rules_path):  # an earlier run's rule model must not pass for this one's
        os.remove(rules_path)

    # -----------------------------------------------------------------------------
    # the final summary: held-out pairwise accuracy against the labels learned (the labelers', or yours); where
    # the world's gold judge is, against the gold order and the gold rule checker, and best-of-n over the SFT
    # model's own test samples, judged (sft.py wrote them): the proxy reward and the gold utility as n grows
    follow_core_share()
    t0 = time.time()
    val_scores, val_rules = score_records(val_records)
    summary = dict(val_acc=pair_accuracy(val_scores, val_records, "ranking"),
                   val_pairs=pair_outcomes(val_scores, val_records, "ranking"), normalization=offset,
                   n_train_prompts=len(train_records), n_val_prompts=len(val_records), n_skipped=n_skipped, k=args.k,
                   epochs=args.epochs, train_seconds=train_seconds, rule_model=rule_model is not None)
    if args.pairs:
        summary.update(pairs=args.pairs, unavailable={
            "rule model": "your pairs carry no rule labels, so it was not trained (no rules.pt)",
            "gold accuracy and best-of-n": "the gold judge knows the world's tasks, not your preference (chat.py "
                                           "--best_of N --reward_dir reranks with any reward model)"})
    else:
        with open(samples_path) as f:
            sft_samples = json.load(f)
        n_per_prompt = sft_samples["n_samples"]
        if max(args.best_of) > n_per_prompt:
            raise ValueError(f"--best_of {max(args.best_of)} needs that many SFT samples per test prompt; sft.py "
                             f"wrote {n_per_prompt} (sft.py --n_samples)")
        groups = [sft_samples["samples"][i:i + n_per_prompt] for i in range(0, len(sft_samples["samples"]),
                                                                            n_per_prompt)]
        scores, rule_probs = score_records([dict(sequences=[prompt + s["tokens"] for s in group])
                                            for prompt, group in zip(sft_samples["prompts"], groups)])
        rows = []
        for n in args.best_of:
            picks = best_of_n(scores, rule_probs, n)  # the gold verdicts came with the samples
            picked = [group[j] for group, j in zip(groups, picks)]
            rows.append(dict(n=n, proxy_reward=fmean(s[j] for s, j in zip(scores, picks)),
                             **{key: [s[key] for s in picked] for key in ("utility", "passed", "violated")}))
            print0(f"best-of-{n:<3d}: proxy reward {rows[-1]['proxy_reward']:+.3f} | gold utility "
                   f"{fmean(rows[-1]['utility']):+.3f} | pass@1 {fmean(rows[-1]['passed']):.1%} | violations "
                   f"{fmean(rows[-1]['violated']):.1%}")
        summary.update(labeler_agreement=agreement, val_pairs_gold=pair_outcomes(val_scores, val_records, "utilities"),
                       val_acc_gold=pair_accuracy(val_scores, val_records, "utilities"),
                       val_rule_acc=rule_accuracy(val_rules, val_records), data_seconds=data_seconds,
                       rollouts_per_s=len(records) * args.k / data_seconds if data_seconds else None,
                       best_of_n=rows, best_of_n_seconds=time.time() - t0)
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print0(f"reward model: held-out pair accuracy {summary['val_acc']:.1%} vs "
           + (f"your labels on {len(val_records)} of your pairs (chance: 50%)" if args.pairs else
              f"labelers, {summary['val_acc_gold']:.1%} vs gold; labelers agree with gold on {agreement:.1%}"))
    for what, why in summary.get("unavailable", {}).items():
        print0(f"not available: {what}: {why}")
