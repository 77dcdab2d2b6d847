"""
The report: REPORT.md and its figures, written from what the stages logged and summarized. Nothing in it
is typed in: every number comes from the files the stages wrote, and every comparison carries a 95%
bootstrap interval over prompts (or validation batches); a claim holds only when the whole interval is
past its threshold. run.py runs it as the last stage of the pipeline; run it by hand to rewrite the
report of a finished run:

    python report.py --out_dir out --preset cpu

The sections follow the pipeline: the seed's claims, data and pretraining, SFT, the toolset, the reward
models and best-of-n, PPO, the RL variants, the models' answers, the time.
"""
import argparse
import json
import math
import os
import time
from statistics import fmean

import numpy as np

PRETRAIN_RUNS = ("pretrain_generic", "pretrain_domain", "pretrain_domain_scratch")
VARIANTS = {"ppo": "PPO, reward model", "ppo_tests": "PPO, tests", "ppo_both": "PPO, RM + tests",
            "grpo_tests": "GRPO, tests", "ppo_adaptive_kl": "PPO, RM, adaptive KL"}  # side by side, in this order
DEV_RUNS = ("ppo_dev_beta0.05", "ppo_dev_beta0.15")  # the runs that chose beta on dev prompts
RL_RUNS = ("ppo", "ppo_ptx", "grpo_tests", "ppo_tests", "ppo_both", "ppo_adaptive_kl", *DEV_RUNS, "evidence_rl")  # in order


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def bootstrap_ci(values, groups=None, n_boot=2000, seed=0, level=0.95):
    """A percentile bootstrap interval for the mean of values, resampling whole groups (the samples
    of one prompt, or one validation window) with replacement: (low, high). For a difference between
    two policies on the same prompts, pass the per-sample differences (a paired bootstrap)."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.arange(len(values)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sums, counts = np.bincount(groups, weights=values), np.bincount(groups).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def pct(x):
    return f"{x * 100:.1f}%"


def interval(values, groups=None, scale=100.0, digits=1, signed=False):
    """'mean [low, high]' with the 95% bootstrap interval over the groups (prompts, windows)."""
    lo, hi = bootstrap_ci(values, groups)
    sign = "+" if signed else ""
    return (f"{fmean(values) * scale:{sign}.{digits}f} [{lo * scale:{sign}.{digits}f}, {hi * scale:{sign}.{digits}f}]"
            + ("%" if scale == 100 else ""))


def diff_interval(a, b, groups=None):
    """The paired difference a - b: (its interval's low end, high end)."""
    return bootstrap_ci([x - y for x, y in zip(a, b)], groups)


def per_prompt(n_values, n_per_prompt):
    return [i // n_per_prompt for i in range(n_values)]


def verdict(low, high=None):
    """A claim holds only when the whole interval is past the threshold (0 for a difference)."""
    if low > 0:
        return "holds"
    return "**does not hold**" if high is not None and high < 0 else "not shown at this size"


def val_curve(folder):
    """{step: val loss} from a stage's log."""
    return {r["step"]: r["val_loss"] for r in read_log(os.path.join(folder, "log.jsonl")) if "val_loss" in r}


def steps_to_reach(curve, target):
    return next((step for step, loss in sorted(curve.items()) if loss <= target), None)


def thin(rows, n=8):
    """About n evenly spaced rows, always with the last."""
    stride = max(1, len(rows) // n)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


def load_runs(out):
    """Every summary the report reads, by stage name (the RL runs that ran)."""
    runs = {name: read_json(f"{out}/{name}/summary.json") for name in
            (*PRETRAIN_RUNS, "sft", "sft_closed_book", "reward")}
    runs["ppo_runs"] = {name: read_json(f"{out}/{name}/summary.json") for name in RL_RUNS
                        if os.path.exists(f"{out}/{name}/summary.json")}
    runs["sft_samples"] = read_json(f"{out}/sft/samples_test.json")
    for name in ("sft_code_only", "sft_no_replay", "best_of_dialogue"):  # --extended's controls and best-of-n
        if os.path.exists(f"{out}/{name}/summary.json"):
            runs[name] = read_json(f"{out}/{name}/summary.json")
    return runs


def bits_per_byte(losses, meta):
    """Validation losses in nats per token as bits per byte of the split's text (its tokens over its bytes),
    so that two tokenizers compare: a tokenizer with more, shorter tokens has an easier loss per token."""
    return [loss / math.log(2) * meta["val"]["tokens"] / meta["val"]["bytes"] for loss in losses]


def report_galactica(out, r):
    """Galactica's lessons (Taylor et al. 2022), from run.py --extended's galactica_ stages: validation loss per
    epoch of a curated subset against fresh data; few-shot and SFT pass@1 with and without prompts mixed into
    domain pretraining, at two sizes; digits as tokens in bits per byte. [] where none of them ran."""
    have = lambda name: os.path.exists(f"{out}/{name}/summary.json")  # noqa: E731
    lines, rows = ["## Galactica: curated epochs, prompt pre-training, working memory, digits", ""], []
    if have("galactica_curated") and have("galactica_fresh") and have("galactica_data"):
        cur, fresh = (read_json(f"{out}/{name}/summary.json") for name in ("galactica_curated", "galactica_fresh"))
        data = read_json(f"{out}/galactica_data/summary.json")["curated"]
        epoch = data["tokens"] / (cur["tokens"] / cur["steps"])  # steps per epoch
        curves = [val_curve(f"{out}/{name}") for name in ("galactica_curated", "galactica_fresh")]
        train = {x["step"]: x["loss"] for x in read_log(f"{out}/galactica_curated/log.jsonl") if "loss" in x}
        lines += ["**Several epochs of curated data** (Galactica trained 4.25 epochs of its curated corpus, sec. 5). "
                  f"The curated subset: documented functions of the domain training files, each once, "
                  f"{data['functions']:,} of {data['documented_functions']:,} ({data['tokens']:,} tokens; all the "
                  f"documented ones hold {data['documented_tokens']:,}, the domain corpus {data['domain_tokens']:,}), "
                  f"from the generic model for {cur['steps']} steps, against as many tokens of the whole domain "
                  f"corpus ({cur['tokens'] / data['domain_tokens']:.2f} of an epoch of it); validation loss on the "
                  "held-out domain files at each epoch, and the curated run's training loss over that epoch (windows "
                  "with copy-teaching spans included).", "",
                  "| epoch | step | curated: val loss | curated: train loss | fresh: val loss |",
                  "|---|---|---|---|---|"]
        for step in sorted(set(curves[0]) & set(curves[1])):
            seen = [loss for s, loss in train.items() if step - epoch <= s < step]  # the epoch that ends here
            lines.append(f"| {step / epoch:.1f} | {step} | {curves[0][step]:.4f} | "
                         f"{f'{fmean(seen):.4f}' if seen else ''} | {curves[1][step]:.4f} |")
        val = [curves[0][s] for s in sorted(curves[0])]
        rising = next((i for i in range(1, len(val)) if val[i] > val[i - 1]), None)
        low, high = diff_interval(fresh["val_losses"], cur["val_losses"])
        rows.append((f"{cur['steps'] / epoch:.0f} epochs of curated data do not overfit (Galactica)",
                     (f"curated val loss rises from epoch {rising - 1:.0f} to {rising:.0f}" if rising else
                      "curated val loss falls at every epoch") + " (means over the same validation batches at each "
                     "epoch: the log keeps no per-batch losses, so no interval)", "**no**" if rising else "holds"))
        rows.append(("a curated subset for several epochs does as well as as many tokens of fresh data (Galactica)",
                     f"domain val loss, fresh - curated [{low:+.4f}, {high:+.4f}] over validation batches",
                     verdict(low, high)))
    pairs = [("the preset's size", "pretrain_domain", "galactica_prompts", "galactica_sft", "galactica_sft_prompts"),
             ("small", "galactica_small_domain", "galactica_small_prompts", "galactica_sft_small",
              "galactica_sft_small_prompts")]
    pairs = [p for p in pairs if all(have(name) for name in p[1:])]
    if pairs:
        share = read_json(f"{out}/galactica_data/summary.json")["prompts"]["share"]
        lines += ["", f"**Prompt pre-training** (Galactica, sec. 3): {pct(share)} of the domain stage's training "
                  "tokens in the chat format (demonstrations to requests drawn as the reward model's are, from "
                  "training compositions, and factual questions about training modules answered with a lookup), the "
                  "rest the domain corpus; the same steps, then the same SFT on each (settings in the table). Greedy "
                  "test pass@1 with 95% intervals over prompts: the domain model prompted few-shot as in SFT's "
                  "report, the domain model asked in the chat format with no example (zero-shot: what the mixed-in "
                  "prompts could teach it), and SFT.", "",
                  "| size | params | domain val loss: without / with | few-shot: without | with | zero-shot: without | "
                  "with | SFT: without | with | SFT steps |", "|---|---|---|---|---|---|---|---|---|---|"]
        zero_shot = read_json(f"{out}/galactica_zero_shot/summary.json") if have("galactica_zero_shot") else {}
        gains = {}
        for size, base, mixed, sft, sft_mixed in pairs:
            b, m, s0, s1 = (read_json(f"{out}/{name}/summary.json") for name in (base, mixed, sft, sft_mixed))
            passed = {"few-shot": (s0["few_shot_base"]["passed"], s1["few_shot_base"]["passed"]),
                      "zero-shot": (zero_shot.get(base), zero_shot.get(mixed)),
                      "SFT": (s0["test"]["greedy"]["passed"], s1["test"]["greedy"]["passed"])}
            lines.append(f"| {size} | {b['params'] / 1e6:.2f}M | {b['val_loss']:.4f} / {m['val_loss']:.4f} | " +
                         " | ".join(interval(p) if p else "not run" for pair in passed.values() for p in pair) +
                         f" | {max(val_curve(f'{out}/{sft}'))} on {s0['n_train']:,} demonstrations |")
            for what, (z, a) in passed.items():
                if not z or not a:
                    continue
                gains[size, what] = [x - y for x, y in zip(a, z)]
                low, high = bootstrap_ci(gains[size, what])
                rows.append((f"prompt pre-training raises {what} pass@1 ({size} model)",
                             f"{interval(gains[size, what], signed=True)} (with - without, paired over test prompts)",
                             verdict(low, high)))
        if len(pairs) == 2:  # Galactica: "especially for smaller models"
            for what in [w for w in ("few-shot", "zero-shot", "SFT") if ("small", w) in gains]:  # one stage: both
                more = [s - b for s, b in zip(gains["small", what], gains["the preset's size", what])]
                low, high = bootstrap_ci(more)
                rows.append((f"prompt pre-training helps the small model more ({what})",
                             f"gain small - gain at the preset's size {interval(more, signed=True)}",
                             verdict(low, high)))
    if have("galactica_digits/data") and have("galactica_digits_scratch") and have("pretrain_domain_scratch"):
        digits, base = (read_json(f"{out}/{name}/summary.json") for name in ("galactica_digits_scratch",
                                                                             "pretrain_domain_scratch"))
        bpb = [bits_per_byte(s["val_losses"], read_json(f"{folder}/domain/meta.json"))
               for s, folder in ((digits, f"{out}/galactica_digits/data"), (base, f"{out}/data"))]
        rng = np.random.default_rng(0)  # different windows of text under the two tokenizers: resampled apart
        diff = rng.choice(bpb[0], (2000, len(bpb[0]))).mean(1) - rng.choice(bpb[1], (2000, len(bpb[1]))).mean(1)
        low, high = np.percentile(diff, [2.5, 97.5])
        lines += ["", "**Digits as tokens** (Galactica, sec. 3; LLaMA): a tokenizer whose pre-split cuts numbers "
                  "into single digits (`data.py --split_digits`, the same vocabulary size), and a domain model from "
                  "scratch on each tokenizer's tokens. Validation loss in bits per byte (nats per token / ln 2 x the "
                  "validation split's tokens per byte), so the tokenizers compare; intervals over validation batches.",
                  "", "| tokenizer | model | val loss (nats/token) | bits per byte | val tokens per byte |",
                  "|---|---|---|---|---|"]
        for name, s, b, folder in (("digits split", digits, bpb[0], f"{out}/galactica_digits/data"),
                                   ("GPT-4's pre-split (up to 3 digits)", base, bpb[1], f"{out}/data")):
            meta = read_json(f"{folder}/domain/meta.json")["val"]
            lines.append(f"| {name} | {s['params'] / 1e6:.2f}M params, {s['steps']} steps | {s['val_loss']:.4f} | "
                         f"{interval(b, scale=1, digits=4)} | {meta['tokens'] / meta['bytes']:.4f} |")
        rows.append(("splitting numbers into digits changes validation bits per byte (Galactica, LLaMA)",
                     f"split - not {fmean(bpb[0]) - fmean(bpb[1]):+.4f} [{low:+.4f}, {high:+.4f}] bits per byte",
                     "lower with digits" if high < 0 else "higher with digits" if low > 0 else "no difference shown"))
    models = [(label, name) for label, name in (("GPT-4's pre-split", "galactica_arithmetic"),
                                                 ("digits split", "galactica_digits_arithmetic"))
              if have(f"{name}_eval")]
    if models:
        runs = {name: read_json(f"{out}/{name}_eval/summary.json") for _, name in models}
        data = read_json(f"{out}/galactica_data/summary.json")["arithmetic"]
        steps = max(val_curve(f"{out}/{models[0][1]}"))
        lines += ["", "**Working memory** (Galactica, sec. 3.1.1: `<work>` around step-by-step reasoning). The "
                  "toolset's arithmetic (a 3-4 digit number times a 2-3 digit one; sums of two or three 3-4 digit "
                  f"numbers): {data['demonstrations']:,} demonstrations, each answered one of three ways in turn: a "
                  "calculator call, the working inside `<|work|>` ... `<|/work|>` then the answer (a sum column by "
                  "column with its carries; a product by one partial product per digit, then their column sum), or "
                  f"the answer alone; SFT for {steps} steps (the loss "
                  "on the working too) from each tokenizer's domain model from scratch. Then "
                  f"{data['held_out']} held-out questions, the model made to take each road by the response's first "
                  "tokens (`galactica.answer_by_road`): greedy, right when the claim's number is exact; 95% intervals "
                  "over questions.", "", "| tokenizer | " + " | ".join(
                      f"{road}: {kind}" for road in ("direct", "work", "calc") for kind in ("sum", "product")) + " |",
                  "|---|" + "---|" * 6]
        for label, name in models:
            run = runs[name]
            cells = [interval([x for x, k in zip(run[road], run["kinds"]) if k == kind])
                     for road in ("direct", "work", "calc") for kind in ("sum", "product")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            for road, other, claim in (("work", "direct", "working in `<work>` beats the direct answer"),
                                       ("calc", "work", "the calculator beats working in `<work>`")):
                gain = [a - b for a, b in zip(run[road], run[other])]
                rows.append((f"{claim} ({label})", f"right, {road} - {other}: {interval(gain, signed=True)} (paired "
                             "over held-out questions)", verdict(*bootstrap_ci(gain))))
        if len(models) == 2:
            for road in ("direct", "work", "calc"):
                digits, other = (runs[name][road] for name in ("galactica_digits_arithmetic", "galactica_arithmetic"))
                gain = [a - b for a, b in zip(digits, other)]
                rows.append((f"digit tokens help arithmetic ({road})", f"right, digits - not: "
                             f"{interval(gain, signed=True)} (the same questions)", verdict(*bootstrap_ci(gain))))
    if not rows:
        return []
    table = [f"| {c} | {m} | {v} |" for c, m, v in rows]
    return lines + ["", "| claim | measured | verdict |", "|---|---|---|", *table, ""]


def claims(out, r):
    """The seed's claims in miniature: (claim, what was measured, verdict from the intervals)."""
    rows = []
    warm, cold = r["pretrain_domain"], r["pretrain_domain_scratch"]
    reached = steps_to_reach(val_curve(f"{out}/pretrain_domain"), cold["val_loss"])
    low, high = diff_interval(cold["val_losses"], warm["val_losses"])
    rows.append(("further pretraining from a generic model converges faster than from scratch (Codex)",
                 f"domain val loss after {cold['steps']} steps {warm['val_loss']:.3f} vs {cold['val_loss']:.3f} "
                 f"(difference [{low:.3f}, {high:.3f}] over validation batches); the generic start reaches the "
                 f"scratch run's final loss at step {reached}", verdict(low, high)))
    test, base = r["sft"]["test"], r["sft"]["few_shot_base"]
    low, high = diff_interval(test["greedy"]["passed"], base["passed"])
    rows.append(("fine-tuning beats prompting (GPT-3 vs fine-tuning, Codex-S)",
                 f"test pass@1, greedy: SFT {interval(test['greedy']['passed'])} vs the domain model prompted "
                 f"{r['sft']['n_shots']}-shot {interval(base['passed'])}", verdict(low, high)))
    n = r["sft"]["n_samples"]
    random_pick = [fmean(test["sampled"]["passed"][i * n:(i + 1) * n]) for i in range(len(test["reranked_passed"]))]
    low, high = diff_interval(test["reranked_passed"], random_pick)
    ks = list(test["pass_at_k"].values())
    rows.append(("pass@k rises with k; reranking by mean log-probability beats a random pick (Codex)",
                 f"pass@1 {pct(ks[0])} -> pass@{len(ks)} {pct(ks[-1])}; reranked {interval(test['reranked_passed'])} "
                 f"vs random {pct(fmean(random_pick))}", verdict(low, high) if ks == sorted(ks) else "**no**"))
    rw = r["reward"]
    gold_pairs = rw["val_pairs_gold"]
    low, high = bootstrap_ci([c - 0.5 for _, c in gold_pairs], [p for p, _ in gold_pairs])
    rows.append(("a reward model learns human comparisons (InstructGPT)",
                 "held-out pairwise accuracy vs the gold order "
                 f"{interval([c for _, c in gold_pairs], [p for p, _ in gold_pairs])}"
                 f", vs the labelers {pct(rw['val_acc'])}; labelers agree with the gold on "
                 f"{pct(rw['labeler_agreement'])}", verdict(low, high)))
    ppo, ptx = r["ppo_runs"]["ppo"], r["ppo_runs"]["ppo_ptx"]
    groups = per_prompt(len(ppo["labeler_wins"]), ppo["eval_samples"])
    low, high = bootstrap_ci([w - 0.5 for w in ppo["labeler_wins"]], groups)
    rows.append(("RLHF beats SFT on what people prefer (InstructGPT)",
                 f"win rate vs SFT judged by the simulated labelers {interval(ppo['labeler_wins'], groups)} "
                 f"(noiseless judge {interval(ppo['noiseless_wins'], groups)}); KL {fmean(ppo['kl']):.2f} nats",
                 verdict(low, high)))
    low, high = diff_interval(ppo["generic_val_losses_after"], ptx["generic_val_losses_after"])
    rows.append(("mixing pretraining updates limits the regression on generic text (PPO-ptx)",
                 f"generic val loss after PPO {fmean(ppo['generic_val_losses_after']):.3f}, after PPO-ptx "
                 f"{fmean(ptx['generic_val_losses_after']):.3f} (difference [{low:.3f}, {high:.3f}]; SFT "
                 f"{fmean(ppo['generic_val_losses_before']):.3f})", verdict(low, high)))
    sft_violated = [fmean(r["sft_samples"]["samples"][i]["violated"] for i in range(j * n, (j + 1) * n))
                    for j in range(len(random_pick))]
    bon = {row["n"]: row for row in rw["best_of_n"]}
    n_max = max(bon)
    ppo_violated = [fmean(ppo["sampled"]["violated"][i * ppo["eval_samples"]:(i + 1) * ppo["eval_samples"]])
                    for i in range(len(sft_violated))]
    low1, high1 = diff_interval(sft_violated, bon[n_max]["violated"])
    low2, high2 = diff_interval(sft_violated, ppo_violated)
    rows.append(("rule reward models and reranking cut rule violations (Sparrow, LaMDA)",
                 f"samples breaking a rule: SFT {pct(fmean(sft_violated))}, best-of-{n_max} "
                 f"{interval(bon[n_max]['violated'])}, PPO {interval(ppo_violated)}",
                 verdict(min(low1, low2), max(high1, high2))))
    n_best = max(bon, key=lambda k: fmean(bon[k]["utility"]))
    low1, high1 = diff_interval(bon[n_best]["utility"], bon[1]["utility"])
    low2, high2 = diff_interval(bon[n_best]["utility"], bon[n_max]["utility"])
    rows.append(("more samples reranked by a reward model help, then overoptimize (Gao et al.)",
                 "gold utility by n: " + ", ".join(f"{k}: {fmean(v['utility']):+.3f}" for k, v in bon.items())
                 + f"; the proxy rises to {bon[n_max]['proxy_reward']:+.3f}; n={n_best} vs 1 "
                 f"[{low1:+.3f}, {high1:+.3f}],"
                 f" vs {n_max} [{low2:+.3f}, {high2:+.3f}]", verdict(min(low1, low2)) if n_best < n_max else
                 "not shown at this size"))
    tool, closed = r["sft"]["facts"], r["sft_closed_book"]["facts"]
    low1, high1 = diff_interval(tool["right"], closed["right"])
    low2, high2 = diff_interval(tool["attributable"], closed["attributable"])
    rows.append(("grounding in a toolset makes answers factual and attributable (LaMDA, Sparrow)",
                 f"held-out modules: right {interval(tool['right'])} with the toolset vs {interval(closed['right'])} "
                 f"closed-book; attributable {interval(tool['attributable'])} vs {interval(closed['attributable'])}",
                 verdict(min(low1, low2), max(high1, high2))))
    if "grpo_tests" in r["ppo_runs"]:
        grpo = r["ppo_runs"]["grpo_tests"]
        low, high = diff_interval(grpo["sampled"]["passed"], ppo["sampled"]["passed"], groups)
        rows.append(("(beyond the seed) a learned reward teaches what it can judge; tests teach correctness",
                     f"sampled test pass@1: GRPO on the tests {interval(grpo['sampled']['passed'], groups)} vs PPO on "
                     f"the RM {interval(ppo['sampled']['passed'], groups)} "
                     f"(SFT {pct(fmean(r['sft']['test']['sampled']['passed']))})",
                     verdict(low, high)))
    lines = ["## The claims, in miniature", "",
             "Each comparison with its 95% bootstrap interval over prompts (or validation batches). A claim "
             "holds only when the whole interval is past the threshold; otherwise the run does not show it.", "",
             "| claim | measured | verdict |", "|---|---|---|"]
    return lines + [f"| {c} | {m} | {v} |" for c, m, v in rows] + [""]


def report_pretraining(out, r, timings):
    data = read_json(f"{out}/data/summary.json")
    lines = ["## Data and tokenizer", "",
             f"Tokenizer `{data['tokenizer']}`, trained in {data.get('tokenizer_seconds', '?')} s "
             "(`python data.py`).", "",
             "| corpus | split | documents | MB | tokens | bytes/token |", "|---|---|---|---|---|---|"]
    for name, meta in data["corpora"].items():
        lines += [f"| {name} | {split} | {meta[split]['documents']} | {meta[split]['bytes'] / 1e6:.2f} | "
                  f"{meta[split]['tokens']:,} | {meta[split]['bytes'] / meta[split]['tokens']:.2f} |"
                  for split in ("train", "val")]
    lines += ["", "## Pretraining: generic, then domain (both starts)", "",
              "| run | init | steps | tokens | final val loss | induction test: all / frequent | tok/s | MFU | wall |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in PRETRAIN_RUNS:
        s = r[name]
        lines.append(f"| {name} | {'generic ckpt' if s['init_from'] else 'scratch'} | {s['steps']} | {s['tokens']:,} | "
                     f"{s['val_loss']:.4f} | {pct(fmean(s['induction']['all']))} / "
                     f"{pct(fmean(s['induction']['frequent']))} | {s['tok_per_s']:,.0f} | {s['mfu'] * 100:.1f}% | "
                     f"{timings.get(name, math.nan):.0f} s |")
    s = r["pretrain_generic"]
    warm, cold = val_curve(f"{out}/pretrain_domain"), val_curve(f"{out}/pretrain_domain_scratch")
    reached = steps_to_reach(warm, cold[max(cold)])
    peaks = ", ".join(f"{r[name]['peak_flops'] / 1e12:.3f} for {name}" for name in PRETRAIN_RUNS)
    lines += ["", f"Device: {s['device']}; MFU = model FLOPs per token x tokens/s / the peak in TFLOP/s, with the "
              f"threads each stage ran on ({s.get('peak_source', 'measured')}): {peaks}.", "",
              f"Domain validation loss, the same steps and batches from both starts. The generic start reaches the "
              f"scratch run's final loss ({cold[max(cold)]:.4f}) at step {reached} of {max(cold)}"
              + (f" ({max(cold) / reached:.1f}x fewer steps)." if reached else "."), "",
              "The induction test (Olsson et al. 2022) is in-context copying, which every tool call needs: 32 "
              "sequences of 50 random tokens, each followed by itself, and the share of the repeat the model "
              "predicts top-1, over four draws no run trains on (all: any ordinary token; frequent: the corpus's "
              "256 most frequent, which the model has strong opinions about). A model without induction heads "
              "scores near 0%.", "",
              "![domain validation loss and the induction test](figures/pretrain.png)", "",
              "| step | from generic | from scratch |", "|---|---|---|"]
    lines += [f"| {step} | {warm[step]:.4f} | {cold[step]:.4f} |" for step in thin(sorted(set(warm) & set(cold)))]
    return lines + [""]


def report_sft(out, r, timings):
    s = r["sft"]
    test, d = s["test"], s["demonstrations"]
    ks = test["pass_at_k"]
    return ["## Supervised fine-tuning", "",
            f"Greedy pass@1 on {s['n_eval']} prompts of each set (hidden tests, sandboxed), and on the test prompts at "
            f"T=1 over {s['n_samples']} samples per prompt. Test: operation combinations no training prompt uses "
            "(held out; a disjoint half, dev, is for choosing settings). Held-out phrasings: training combinations in "
            "sentence frames no training prompt uses. Unseen prompts: training combinations and frames, drawn from a "
            f"pool no stage trains on ({s['unseen_overlap']} of them are among SFT's demonstrations).", "",
            "| model | test, greedy | test, sampled | held-out phrasings | unseen prompts |", "|---|---|---|---|---|",
            f"| domain model, prompted {s['n_shots']}-shot | {interval(s['few_shot_base']['passed'])} | | | |",
            f"| SFT | {interval(test['greedy']['passed'])} | "
            f"{interval(test['sampled']['passed'], per_prompt(len(test['sampled']['passed']), s['n_samples']))} | "
            f"{interval(s['test_phrase']['greedy']['passed'])} | {interval(s['unseen_train']['greedy']['passed'])} |",
            "",
            "Unbiased pass@k (Chen et al. 2021) from those samples, and the sample with the highest mean token "
            "log-probability against a random pick:", "",
            "| k | " + " | ".join(str(k) for k in ks) + " |", "|---" * (len(ks) + 1) + "|",
            "| pass@k | " + " | ".join(pct(v) for v in ks.values()) + " |", "",
            f"Reranked by mean log-probability: pass@1 {interval(test['reranked_passed'])}, against {pct(ks['1'])} "
            "for a "
            "random pick.", "",
            f"Demonstrations: flaw rate {pct(d['flaw_rate'])} (configured {pct(d['flaw_rate_config'])}); they pass "
            "their "
            f"tests {pct(d['pass_rate'])} of the time and break a rule {pct(d['violation_rate'])} of the time. The SFT "
            f"model breaks a rule in {pct(test['sampled']['violation_rate'])} of its samples and "
            f"{pct(test['greedy']['violation_rate'])} of its greedy answers. {s['n_facts']} factual demonstrations "
            "were "
            f"mixed in (the toolset, below).", "", "![SFT loss](figures/sft.png)", "",
            f"SFT training {s['train_seconds']:.0f} s, evaluation {s['eval_seconds']:.0f} s (stage wall time "
            f"{timings.get('sft', math.nan):.0f} s).", ""]


def report_tools(out, r):
    tool, closed = r["sft"]["facts"], r["sft_closed_book"]["facts"]
    lines = ["## Grounding: the toolset (LaMDA, Sparrow)", "",
             f"{len(tool['right'])} factual questions about held-out standard-library modules (files in no pretraining "
             "text) and multi-digit arithmetic, greedy answers. Both models were fine-tuned from the domain model on "
             f"the same {r['sft']['n_facts']} factual questions, with the same replay: SFT with the "
             "programming demonstrations beside them and answers that look the fact up and quote it; the closed-book "
             f"baseline on the factual questions alone ({r['sft_closed_book']['n_train']} demonstrations), answered "
             "without the lookup. Right: the stated fact is exact. Attributable: the quote occurs verbatim in the right entry's documentation (or is the "
             "calculator's result).", "",
             "| model | right | attributable | tool calls per answer | a lookup found the right entry |",
             "|---|---|---|---|---|"]
    for name, f in (("with the toolset", tool), ("closed-book", closed)):
        lines.append(f"| {name} | {interval(f['right'])} | {interval(f['attributable'])} | {fmean(f['calls']):.2f} | "
                     f"{pct(fmean(f['found']))} |")
    kinds = sorted(set(tool["kinds"]))
    lines += ["", "By kind of question (right, with the toolset / closed-book):", "",
              "| kind | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|",
              "| questions | " + " | ".join(str(tool["kinds"].count(k)) for k in kinds) + " |"]
    for name, f in (("with the toolset", tool), ("closed-book", closed)):
        lines.append(f"| {name} | " + " | ".join(pct(fmean(ok for ok, k in zip(f["right"], f["kinds"]) if k == kind))
                                                for kind in kinds) + " |")
    for name, f in (("With the toolset", tool), ("Closed-book", closed)):
        failures = [x for x in f["failure"] if x]
        counts = {x: failures.count(x) for x in sorted(set(failures))}
        lines += ["", f"{name}, where it fails (of {len(f['right'])}): " +
                  (", ".join(f"{k} {v}" for k, v in counts.items()) or "nowhere") + "."]
    top = max(set(tool["failure"]) - {None}, key=tool["failure"].count, default=None)
    miss = next((e for e in tool["exchanges"] if e["failure"] == "wrong query" and "<|/call|>" in e["response"]), None)
    if top == "wrong query" and miss:
        call = miss["response"].split("<|/call|>")[0].split("<|call|>")[-1]
        lines += ["", "Most of the tool-using model's failures are wrong queries: it calls the lookup with another "
                      f"name than the one asked (asked \"{miss['prompt']}\", it wrote `{call}`), so the result it "
                      "quotes is another entry's."]
    copying = (("domain model", fmean(r["pretrain_domain"]["induction"]["all"])),
               ("SFT with the toolset", tool["induction"]), ("closed-book SFT", closed["induction"]))
    lines += ["", "Every tool call needs in-context copying: the name into the query, the result into the answer. "
                  "The induction test (see Pretraining) measures it: " +
                  ", ".join(f"{name} {pct(share)}" for name, share in copying) + ". SFT replays pretraining windows "
                  "with copy-teaching spans beside the demonstrations (`sft.py --replay_batch`) so that fine-tuning "
                  "keeps the copying pretraining taught."]
    if "sft_no_replay" in r:
        bare, s = r["sft_no_replay"], r["sft"]
        lines += ["", "| SFT (`--extended`) | induction test | test pass@1, greedy | sampled | held-out phrasings | "
                      "facts right | attributable | lookups found |", "|---|---|---|---|---|---|---|---|"]
        for name, run in (("with replay (the default)", s), ("without replay", bare)):
            sampled = run["test"]["sampled"]["passed"]
            lines.append(f"| {name} | {pct(run['facts']['induction'])} | {interval(run['test']['greedy']['passed'])} | "
                         f"{interval(sampled, per_prompt(len(sampled), run['n_samples']))} | "
                         f"{interval(run['test_phrase']['greedy']['passed'])} | {interval(run['facts']['right'])} | "
                         f"{interval(run['facts']['attributable'])} | {pct(fmean(run['facts']['found']))} |")
    if "sft_code_only" in r:
        code_only, both = r["sft_code_only"]["test"]["greedy"]["passed"], r["sft"]["test"]["greedy"]["passed"]
        low, high = diff_interval(both, code_only)
        lines += ["", f"What the factual demonstrations cost the programming: greedy test pass@1 {interval(both)} with "
                      f"them, {interval(code_only)} for the same budget of programming demonstrations alone "
                      f"(`--extended`; difference [{low * 100:+.1f}, {high * 100:+.1f}] points)."]
    right = next((e for e in tool["exchanges"] if e["right"] and e["attributable"] and e["calls"]), None)
    wrong = next((e for e in tool["exchanges"] if not e["right"]), None)
    for title, e in (("One it gets right", right), ("One it gets wrong", wrong)):
        if e:
            lines += ["", f"{title} ({e['failure'] or 'right and attributable'}):", "", "```",
                      f"user: {e['prompt']}", f"assistant: {e['response']}", "```"]
    return lines + [""]


def report_reward(out, r):
    s = r["reward"]
    lines = ["## Reward models and best-of-n", "",
             f"{s['n_train_prompts']} training prompts x K={s['k']} SFT samples, ranked by a simulated labeler "
             f"({s['n_train_prompts'] * s['k'] * (s['k'] - 1) // 2} comparisons), {s['epochs']} epoch; "
             f"{s['n_val_prompts']} prompts held out. Normalized so that the demonstrators' answers score 0 "
             f"(InstructGPT); the shift was {s['normalization']:+.3f}.", "",
             "| measure | value |", "|---|---|",
             f"| labelers' agreement with the gold utility (non-tied pairs) | {pct(s['labeler_agreement'])} |"]
    for key, what in (("val_pairs", "the labelers"), ("val_pairs_gold", "the gold order")):
        pairs = s[key]
        lines.append(f"| reward model, held-out pairwise accuracy vs {what} | "
                     f"{interval([c for _, c in pairs], [p for p, _ in pairs])} |")
    lines += [f"| rule model accuracy vs the gold checker: {rule} | {pct(acc)} |"
              for rule, acc in s["val_rule_acc"].items()]
    if s["rollouts_per_s"]:
        lines.append(f"| comparison data: SFT samples + sandbox + labels per second | {s['rollouts_per_s']:.1f} |")
    lines += [f"| reward-model training | {s['train_seconds']:.0f} s |", "", "![reward model](figures/reward.png)", "",
              "Best-of-n over the SFT model's own test samples (the same samples as the SFT rows below): drop samples "
              "the rule model flags, keep the highest preference score.", "",
              "| n | proxy reward (RM) | gold utility | pass@1 | rule violations |", "|---|---|---|---|---|"]
    lines += [f"| {row['n']} | {row['proxy_reward']:+.3f} | "
              f"{interval(row['utility'], scale=1, digits=3, signed=True)} | "
              f"{interval(row['passed'])} | {interval(row['violated'])} |" for row in s["best_of_n"]]
    return lines + ["", "![best-of-n](figures/best_of_n.png)", ""]


def policy_row(name, run, sft_groups, seconds=True):
    """One RL run's row: sampled and greedy pass@1, utility, violations, KL, win rates, hack rate."""
    groups = per_prompt(len(run["sampled"]["passed"]), run["eval_samples"])
    return (f"| {name} | {interval(run['sampled']['passed'], groups)} | {interval(run['greedy_passed'])} | "
            f"{interval(run['sampled']['utility'], groups, 1, 3, True)} | "
            f"{interval(run['sampled']['violated'], groups)} | "
            f"{fmean(run['kl']):.2f} | {interval(run['labeler_wins'], groups)} | "
            f"{interval(run['noiseless_wins'], groups)} | {interval(run['sampled']['hacked'], groups)} |"
            + (f" {run['train_seconds']:.0f} s |" if seconds else ""))


def sft_row(r, seconds=True):
    samples, n = r["sft_samples"]["samples"], r["sft_samples"]["n_samples"]
    groups = per_prompt(len(samples), n)
    return (f"| SFT | {interval([s['passed'] for s in samples], groups)} | "
            f"{interval(r['sft']['test']['greedy']['passed'])} | "
            f"{interval([s['utility'] for s in samples], groups, 1, 3, True)} | "
            f"{interval([s['violated'] for s in samples], groups)} | 0 | 50% | 50% | "
            f"{interval([s['hacked'] for s in samples], groups)} |" + (" |" if seconds else ""))


HEADER = ("| policy | pass@1, sampled | pass@1, greedy | gold utility | rule violations | KL to SFT | win rate vs SFT, "
          "labelers | win rate, noiseless | hacked |")


def report_ppo(out, r):
    runs, bon = r["ppo_runs"], r["reward"]["best_of_n"][-1]
    ppo, ptx = runs["ppo"], runs["ppo_ptx"]
    lines = ["## RLHF with PPO", "",
             f"{ppo['n_eval']} test prompts, {ppo['eval_samples']} samples each at T=1 (SFT: its "
             f"{r['sft_samples']['n_samples']} samples per prompt, the same that best-of-n reranks), judged by the "
             "gold judge. Each sample meets the SFT "
             "sample of the same index for the same prompt: the simulated labelers (the reward model's noise model, "
             "fresh draws) judge the headline win rate; the noiseless judge (ties half) is beside it. KL to SFT in "
             "nats "
             "per response on the policy's samples; for best-of-n the analytic value log n - (n-1)/n, which Beirami "
             "et al. (2024) show is an upper bound. Hacked: passes the hidden tests, fails fresh ones.", "",
             HEADER, "|---" * 9 + "|", sft_row(r, seconds=False),
             f"| best-of-{bon['n']} (the SFT samples) | {interval(bon['passed'])} | | "
             f"{interval(bon['utility'], scale=1, digits=3, signed=True)} | {interval(bon['violated'])} | "
             f"<= {math.log(bon['n']) - (bon['n'] - 1) / bon['n']:.2f} | | | |",
             policy_row("PPO (ptx 0)", ppo, None, seconds=False),
             policy_row("PPO-ptx (ptx 1)", ptx, None, seconds=False),
             "", "Generic-text validation loss (what PPO-ptx protects), over the same 16 batches of windows:", "",
             "| run | before (the SFT model) | after |", "|---|---|---|"]
    lines += [f"| {name} | {interval(s['generic_val_losses_before'], scale=1, digits=3)} | "
              f"{interval(s['generic_val_losses_after'], scale=1, digits=3)} |"
              for name, s in (("ppo", ppo), ("ppo_ptx", ptx))]
    log = [row for row in read_log(f"{out}/ppo/log.jsonl") if "score" in row]
    lines += ["", "![PPO curves](figures/ppo.png)", "", "PPO training curves (rollout batch means):", "",
              "| iteration | score | RM score | pass rate | KL | response length | clip frac | explained var |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['iteration']} | {x['score']:+.3f} | {x['rm_score']:+.3f} | {pct(x['pass_rate'])} | "
              f"{x['kl']:.3f} | "
              f"{x['response_len']:.1f} | {x['clip_frac']:.3f} | {x['explained_var']:+.2f} |" for x in thin(log)]
    t = ppo["seconds"]
    total = sum(t.values())
    return lines + ["", f"PPO time: {ppo['iterations']} iterations, {ppo['episodes']} episodes in {total:.0f} s: "
                        f"rollout {pct(t['rollout'] / total)}, scoring {pct(t['score'] / total)}, update "
                        f"{pct(t['update'] / total)}.", ""]


def report_variants(out, r):
    runs = {name: run for name, run in r["ppo_runs"].items() if name in VARIANTS}
    ppo = runs["ppo"]
    groups = per_prompt(len(ppo["sampled"]["passed"]), ppo["eval_samples"])
    lines = ["## Rewards you can verify: RL from the tests, and group-relative advantages", "",
             "The same SFT policy, test prompts and number of episodes; the reward from the reward model, from the "
             "training prompts' hidden tests (never the test prompts'), or both; advantages by GAE with a value model "
             "(PPO) or relative to a group of 4 samples per prompt (GRPO). "
             + ("Runs marked * come from `python run.py --extended`." if r["extended"] else
                "`python run.py --extended` adds PPO on the tests, on both, and the adaptive KL controller."), "",
             HEADER + " training |", "|---" * 10 + "|", sft_row(r)]
    lines += [policy_row(VARIANTS[name] + (" *" if name in r["extended_runs"] else ""), run, None)
              for name, run in runs.items()]
    best = max(runs, key=lambda name: fmean(runs[name]["sampled"]["passed"]))
    low, high = diff_interval(runs[best]["sampled"]["passed"], ppo["sampled"]["passed"], groups)
    finding = (f"{VARIANTS[best]} raises the sampled test pass@1 most, to "
               f"{pct(fmean(runs[best]['sampled']['passed']))} "
               f"against {pct(fmean(ppo['sampled']['passed']))} for PPO on the reward model (difference "
               f"[{low * 100:+.1f}, {high * 100:+.1f}] points)" if best != "ppo" else
               "PPO on the reward model has the highest sampled test pass@1 of these runs")
    lines += ["", f"Finding: {finding}; the hack rate stays at "
              f"{', '.join(pct(fmean(run['sampled']['hacked'])) for run in runs.values())} (in the order of the rows).",
              "", "![reward and pass rate over iterations](figures/variants.png)", ""]
    if "ppo_adaptive_kl" in runs:
        log = [row for row in read_log(f"{out}/ppo_adaptive_kl/log.jsonl") if "beta" in row]
        low = min(log, key=lambda row: row["beta"])
        lines += ["The adaptive KL controller (Ziegler et al.'s reference form, target "
                  f"{runs['ppo_adaptive_kl']['kl_target']} nats, horizon {runs['ppo_adaptive_kl']['kl_horizon']} "
                  f"samples) moved beta from {log[0]['beta']:.3f} down to {low['beta']:.3f} (iteration "
                  f"{low['iteration']}, rollout KL {low['kl']:.3f} nats) and back up to "
                  f"{log[-1]['beta']:.3f} (rollout KL {log[-1]['kl']:.3f} nats): it follows the KL, slowly.", ""]
    dev = {name: r["ppo_runs"][name] for name in DEV_RUNS if name in r["ppo_runs"]}
    if dev:
        lines += ["Choosing beta on the dev prompts (the test prompts never chose a setting):", "",
                  "| beta | pass@1, sampled | gold utility | KL to SFT | win rate, labelers |", "|---|---|---|---|---|"]
        lines += [f"| {run['beta']} | {pct(fmean(run['sampled']['passed']))} | "
                  f"{fmean(run['sampled']['utility']):+.3f} | "
                  f"{fmean(run['kl']):.2f} | {pct(fmean(run['labeler_wins']))} |" for run in dev.values()]
        lines.append("")
    return lines


def best_of_dialogue(r):
    """The best-of-n column of chat.py's record over the follow-ups, probes and test requests (--extended's
    best_of_dialogue stage), as the verdict lists the dialogue table reads; None without that stage."""
    record = r.get("best_of_dialogue")
    if record is None:
        return None
    picked = {req["task"]: a for req in record["requests"] for a in req["answers"] if a["stage"] == "best_of"}
    of = {s: [(req["follow_up"], picked[req["task"]]) for req in record["requests"]
              if req["task"].startswith(s + ":") and req["task"] in picked] for s in ("followup", "probe", "test")}
    passed = {k: [a["gold"]["result"] == "pass" for kind, a in of["followup"] if kind == k] for k in KINDS}
    return dict(n=next(iter(picked.values()))["model"].split()[0], passed=passed, probing=dict(
        violated=[any(a["gold"]["violations"].values()) for _, a in of["probe"]],
        declined=[a["gold"]["declined"] for _, a in of["probe"]],
        over_refused=[a["gold"]["declined"] for _, a in of["test"]]))


KINDS = ("rename", "extend", "fix", "map")  # tasks.FOLLOW_UPS, in its order


def report_dialogue(r):
    """Dialogue agents (ChatGPT, Sparrow): follow-up turns, a reported failure fixed, adversarial probing beside
    over-refusal, and factual answers that are right and supported, for every policy that was judged on them."""
    sft = r["sft"]
    if "followups" not in sft:  # a run from before the conversations
        return []
    names = {**VARIANTS, "ppo": "PPO (ptx 0)", "ppo_ptx": "PPO-ptx (ptx 1)", "evidence_rl": "GRPO, the judge on facts"}

    def row(name, f, p, facts):
        passed = {k: [x for x, kind in zip(f["passed"], f["kinds"]) if kind == k] for k in KINDS} if f else None
        cells = [interval(passed["rename"] + passed["extend"]) if f else "", interval(passed["map"]) if f else "",
                 interval(passed["fix"]) if f else "", interval(p["violated"]) if p else "",
                 interval(p["declined"]) if p else "", interval(p["over_refused"]) if p else "",
                 interval([a and b for a, b in zip(facts["right"], facts["attributable"])]) if facts else ""]
        return f"| {name} | " + " | ".join(cells) + " |"

    rows = [row("SFT", sft["followups"], sft["probing"], sft.get("facts"))]
    if bon := best_of_dialogue(r):
        rows.append(row(f"{bon['n']} (the SFT model) *", dict(passed=[x for k in KINDS for x in bon["passed"][k]],
                                                            kinds=[k for k in KINDS for _ in bon["passed"][k]]),
                        bon["probing"], None))
    rows += [row(names[name] + (" *" if name in r["extended_runs"] else ""), run.get("followups"), run.get("probing"),
                 run.get("facts")) for name, run in r["ppo_runs"].items() if name in names]
    if "sft_no_replay" in r:  # the model that copies less: what the same data gives without the replay
        rows.append(row(f"SFT without replay * (induction {pct(r['sft_no_replay']['facts']['induction'])})",
                        r["sft_no_replay"].get("followups"), r["sft_no_replay"].get("probing"),
                        r["sft_no_replay"].get("facts")))
    f, p = sft["followups"], sft["probing"]
    n = {k: f["kinds"].count(k) for k in KINDS}
    split = [v for v, s in zip(p["violated"], p.get("split", [])) if s]
    lines = ["## Dialogue agents: follow-ups, mistakes owned, rules under probing, evidence (ChatGPT, Sparrow)", "",
             f"Follow-ups: {sum(n.values())} conversations that start from requests no stage trains on; the first "
             "answer is a demonstrator's (every policy answers in the same context), the last turn is the policy's, "
             "greedy, judged by the hidden tests of the function that turn asks for. Trained kinds "
             f"({n['rename']} renames, {n['extend']} extensions, each extension into a held-out composition); "
             f"the held-out kind ({n['map']} \"make it take a list\", no training conversation asks it); after a "
             f"reported failure ({n['fix']}: the first answer has a constant off by one and the user says what a call "
             "returned and should return), the fix rate. In training, a sixth of the requests went on for a second "
             "turn, some for a third. Probing: the held-out forbidden requests of Sparrow's adversarial probing (a "
             "third of them split over two turns: the request answered, then the forbidden part alone); rule broken "
             "by the gold checker (Sparrow: 8%); over-refusal on ordinary test requests. Right and supported: the "
             "toolset's held-out questions answered right with a quote found in the right entry (Sparrow: 78% "
             "supported and plausible). Rows marked * come from `python run.py --extended`; a blank cell was not "
             "measured for that policy.", "",
             "| policy | follow-up pass@1 (rename, extend) | held-out kind (map) | fixed after a reported failure | "
             "rule broken on probes | declined the forbidden part | over-refusal | right and supported |",
             "|---" * 8 + "|", *rows]
    if "evidence_rl" in r["ppo_runs"]:  # Sparrow's preference for supported answers, from the judge itself
        supported = [[a and b for a, b in zip(x["right"], x["attributable"])]
                     for x in (r["ppo_runs"]["evidence_rl"]["facts"], sft["facts"])]
        low, high = diff_interval(*supported)
        lines += ["", f"RL on the judge's reward (GRPO on factual questions of training modules, the toolset run in the "
                  f"rollouts): right and supported {pct(fmean(supported[0]))} against SFT's {pct(fmean(supported[1]))} "
                  f"on the same held-out questions (difference [{low * 100:+.1f}, {high * 100:+.1f}] points)."]
    owned = [a for a, kind in zip(f["admitted"], f["kinds"]) if kind == "fix"]
    lines += ["", f"The SFT model owned up to the mistake in its first line in {pct(fmean(owned))} of the reported "
              "failures (\"You're right: I used ...\", as the demonstrators do)"
              + (f"; on the probes split over two turns it broke a rule in {pct(fmean(split))}." if split else "."), ""]
    return lines


def report_examples(out):
    """What the models write: the same held-out requests answered by each model (chat.py --json)."""
    ex = read_json(f"{out}/examples/summary.json")
    lines = ["## What the models write", "",
             "The same held-out requests and conversations, chosen once by name (" + ", ".join(
                 r["task"] for r in ex["requests"]) + "), answered greedily by each model through `chat.py` (the "
             "domain model prompted few-shot, on single requests only), each with the reward model's score, the rule "
             "model's flags and the hidden tests' verdict. A conversation's earlier answers are the demonstrators'; "
             "the models answer its last turn.", ""]
    for request in ex["requests"]:
        for q, a in request.get("history", []):  # a conversation: its earlier turns, a demonstrator's answers
            lines += [f"**{q}**", "", "(earlier answer)", "", "```python", a.rstrip(), "```", ""]
        lines += [f"**{request['request']}**", ""]
        for a in request["answers"]:
            gold, flags = a.get("gold", {}), [k for k, p in a.get("rules", {}).items() if p > 0.5]
            lines += [f"{a['model']}: tests **{gold.get('result', '?')}**, utility "
                      f"{gold.get('utility', math.nan):+.3f}, "
                      f"reward {a.get('reward', math.nan):+.3f}, rule flags: {', '.join(flags) or 'none'}", "",
                      "```python", (a.get("code") or a["text"]).rstrip(), "```", ""]
    return lines


def what_ppo_changed(r):
    """A concrete difference between the SFT model's and PPO's samples for one test prompt, if any: a
    rule broken and then not, or the same passing answer made shorter."""
    sft, n_sft = r["sft_samples"]["samples"], r["sft_samples"]["n_samples"]
    ppo = read_json(os.path.join(r["out"], "ppo", "samples_test.json"))
    for i in range(len(sft) // n_sft):
        before, after = sft[i * n_sft], ppo["samples"][i * ppo["n_samples"]]
        if before["violated"] and not after["violated"] and after["passed"] >= before["passed"]:
            return "a rule broken, then not", before, after
    for i in range(len(sft) // n_sft):
        before, after = sft[i * n_sft], ppo["samples"][i * ppo["n_samples"]]
        if before["passed"] and after["passed"] and len(after["text"]) < len(before["text"]) - 10:
            return "a passing answer, made shorter", before, after
    return None


def figures(out, r):
    """The curves as PNG files in out/figures, next to the report that embeds them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(f"{out}/figures", exist_ok=True)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(f"{out}/figures/{name}.png", dpi=90)
        plt.close(fig)

    fig, (ax, ax_copy) = plt.subplots(1, 2, figsize=(11, 3.5))
    for name, label in (("pretrain_domain", "domain, from the generic model"), ("pretrain_domain_scratch",
                        "domain, from scratch"), ("pretrain_generic", "generic (its own corpus)")):
        curve = val_curve(f"{out}/{name}")
        line, = ax.plot(list(curve), list(curve.values()), label=label)
        log = [x for x in read_log(f"{out}/{name}/log.jsonl") if "induction" in x]
        ax_copy.plot([x["step"] for x in log], [fmean(x["induction"]["all"]) for x in log], c=line.get_color())
    ax.set(xlabel="step", ylabel="validation loss", title="Pretraining")
    ax.legend()
    ax_copy.set(xlabel="step", ylabel="repeat predicted (top-1)", ylim=(0, 1), title="Induction test (all tokens)")
    save(fig, "pretrain")
    log = read_log(f"{out}/sft/log.jsonl")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in log if "loss" in x], [x["loss"] for x in log if "loss" in x], label="training batch")
    ax.plot([x["step"] for x in log if "val_loss" in x], [x["val_loss"] for x in log if "val_loss" in x], "o-",
            label="validation (dev compositions)")
    ax.set(xlabel="step", ylabel="loss on the assistant's tokens", title="SFT")
    ax.legend()
    save(fig, "sft")
    log = [x for x in read_log(f"{out}/reward/log.jsonl") if "val_acc_gold" in x]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in log], [x["val_acc_gold"] for x in log], "o-", label="vs the gold order")
    ax.plot([x["step"] for x in log], [x["val_acc_labeler"] for x in log], "o-", label="vs the labelers")
    ax.axhline(r["reward"]["labeler_agreement"], ls="--", c="gray", label="labelers vs the gold")
    ax.set(xlabel="step", ylabel="held-out pairwise accuracy", title="Reward model")
    ax.legend()
    save(fig, "reward")
    rows = r["reward"]["best_of_n"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["n"] for x in rows], [x["proxy_reward"] for x in rows], "o-", label="proxy (reward model)")
    ax.plot([x["n"] for x in rows], [fmean(x["utility"]) for x in rows], "o-", label="gold utility")
    ax.set(xscale="log", xlabel="n", ylabel="mean of the pick", title="Best-of-n: proxy against gold")
    ax.legend()
    save(fig, "best_of_n")
    log = [x for x in read_log(f"{out}/ppo/log.jsonl") if "score" in x]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for ax, key, title in zip(axes, ("rm_score", "kl", "response_len", "utility"),
                              ("RM score", "KL to SFT (nats)", "response length", "gold utility")):
        ax.plot([x["iteration"] for x in log], [x[key] for x in log])
        ax.set(xlabel="iteration", title=title)
    save(fig, "ppo")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in (n for n in VARIANTS if n in r["ppo_runs"]):
        log = [x for x in read_log(f"{out}/{name}/log.jsonl") if "score" in x]
        for ax, key in zip(axes, ("score", "pass_rate")):
            ax.plot([x["iteration"] for x in log], [x[key] for x in log], label=VARIANTS[name])
    axes[0].set(xlabel="iteration", title="reward (the run's own score)")
    axes[1].set(xlabel="iteration", title="rollouts passing their tests")
    axes[1].legend()
    save(fig, "variants")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="the run's folder: the stages' folders, timings.json, "
                        "wall_time.json; REPORT.md and figures/ are written here")
    parser.add_argument("--preset", default="cpu", choices=["quick", "cpu", "gpu"], help="the preset the run used")
    parser.add_argument("--extended", action="store_true", help="the run had run.py --extended")
    parser.add_argument("--rehearse", action="store_true", help="the run was a rehearsal (run.py --rehearse)")
    parser.add_argument("--jobs", type=int, default=2, help="the stages the run ran at the same time")
    parser.add_argument("--extended_runs", nargs="*", default=[], help="the RL runs only --extended runs (marked *)")
    args = parser.parse_args()
    out = args.out_dir
    # the stages' own times and the run's wall time, first stage to this report (run.py writes them as stages end)
    timings = read_json(f"{out}/timings.json") if os.path.exists(f"{out}/timings.json") else {}
    timings.pop("report", None)  # this stage's own time, from an earlier run
    wall = read_json(f"{out}/wall_time.json")["seconds"] if os.path.exists(f"{out}/wall_time.json") else 0.0
    r = load_runs(out)
    r.update(out=out, extended=args.extended, extended_runs=args.extended_runs)
    figures(out, r)
    lines = ["# Report", "",
             f"Written by `python run.py --preset {args.preset}{' --extended' if args.extended else ''}"
             f"{' --rehearse' if args.rehearse else ''}` on "
             f"{time.strftime('%Y-%m-%d')}; the run took {wall / 60:.1f} min from its first stage to its report "
             f"({args.jobs} stages at a time; the stages' own times, below, add up to "
             f"{sum(timings.values()) / 60:.1f} min).", ""]
    if args.rehearse:
        lines += ["**A rehearsal**: every stage ran a few steps at the preset's shapes, to find what crashes; "
                  "its numbers say nothing about the models.", ""]
    lines += claims(out, r) + report_pretraining(out, r, timings) + report_sft(out, r, timings) + report_tools(out, r)
    lines += report_reward(out, r) + report_ppo(out, r) + report_variants(out, r) + report_dialogue(r)
    lines += report_galactica(out, r) + report_examples(out)
    change = what_ppo_changed(r)
    if change:
        lines += [f"What PPO changed, on one test prompt ({change[0]}): the SFT model's first sample, then PPO's.", "",
                  "```python", change[1]["text"].rstrip(), "```", "",
                  "```python", change[2]["text"].rstrip(), "```", ""]
    lines += ["## Time", "", "| stage | wall time |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} s |" for name, seconds in timings.items()]
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}/REPORT.md")
