"""
The whole pipeline in one command: each stage runs its own script in a subprocess, exactly as you
would by hand, then REPORT.md is written from the stages' logs and summaries. Nothing in the
report is typed in: every number comes from the files the stages wrote.

    pip install -r requirements.txt && python run.py              # the cpu preset
    python run.py --preset quick                                  # every stage, small and fast
    python run.py --preset gpu --out_dir out_gpu                  # GPT-2 small on one GPU

Re-running skips every stage whose summary.json exists; an interrupted stage resumes from its
checkpoint. Delete a stage's folder under out_dir to run it again.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time


def stage_commands(args):
    """(folder, script arguments) for every stage, in order."""
    o, p = args.out_dir, ["--preset", args.preset]
    tok = ["--tokenizer", f"{o}/tokenizer.json"]
    data = ["data.py", "--out_dir", o] + (["--max_chars", "2000000", "--vocab_size", "2048"] if args.preset == "quick" else [])
    return [
        ("data", data),
        ("pretrain_generic", ["pretrain.py", *p, *tok, "--data", f"{o}/data/generic", "--out_dir", f"{o}/pretrain_generic"]),
        ("pretrain_domain", ["pretrain.py", *p, *tok, "--data", f"{o}/data/domain", "--out_dir", f"{o}/pretrain_domain",
                             "--init_from", f"{o}/pretrain_generic/ckpt.pt"]),
        ("pretrain_domain_scratch", ["pretrain.py", *p, *tok, "--data", f"{o}/data/domain",
                                     "--out_dir", f"{o}/pretrain_domain_scratch"]),
        ("sft", ["sft.py", *p, *tok, "--init_from", f"{o}/pretrain_domain/ckpt.pt", "--out_dir", f"{o}/sft"]),
        ("reward", ["reward.py", *p, *tok, "--sft", f"{o}/sft/ckpt.pt", "--out_dir", f"{o}/reward"]),
        *[(name, ["ppo.py", *p, *tok, "--sft", f"{o}/sft/ckpt.pt", "--reward_dir", f"{o}/reward", "--generic_data",
                  f"{o}/data/generic", "--out_dir", f"{o}/{name}", "--ptx_coef", ptx])
          for name, ptx in (("ppo", "0"), ("ppo_ptx", str(args.ptx_coef)))],
    ]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def val_curve(folder):
    """{step: val loss} from a stage's log (a resumed run may log a step twice; the last wins)."""
    return {r["step"]: r["val_loss"] for r in read_log(os.path.join(folder, "log.jsonl")) if "val_loss" in r}


def steps_to_reach(curve, target):
    return next((step for step, loss in sorted(curve.items()) if loss <= target), None)


def report_pretraining(o, timings):
    data = read_json(f"{o}/data/summary.json")
    lines = ["## Data and tokenizer", "",
             f"Tokenizer `{data['tokenizer']}`, trained in {data.get('tokenizer_seconds', '?')} s "
             f"(`python data.py`).", "",
             "| corpus | split | documents | MB | tokens | bytes/token |", "|---|---|---|---|---|---|"]
    for name, meta in data["corpora"].items():
        for split in ("train", "val"):
            m = meta[split]
            lines.append(f"| {name} | {split} | {m['documents']} | {m['bytes'] / 1e6:.2f} | {m['tokens']:,} | "
                         f"{m['bytes'] / m['tokens']:.2f} |")
    lines += ["", "## Pretraining: generic, then domain (both starts)", "",
              "| run | init | steps | tokens | final val loss | tok/s | MFU | wall |", "|---|---|---|---|---|---|---|---|"]
    for name in ("pretrain_generic", "pretrain_domain", "pretrain_domain_scratch"):
        s = read_json(f"{o}/{name}/summary.json")
        lines.append(f"| {name} | {'scratch' if not s['init_from'] else 'generic ckpt'} | {s['steps']} | "
                     f"{s['tokens']:,} | {s['val_loss']:.4f} | {s['tok_per_s']:,.0f} | {s['mfu'] * 100:.1f}% | "
                     f"{timings.get(name, float('nan')):.0f} s |")
    s = read_json(f"{o}/pretrain_generic/summary.json")
    lines += ["", f"Device: {s['device']}; MFU = model FLOPs per token x tokens/s / {s['peak_flops'] / 1e12:.3f} "
              f"TFLOP/s ({'measured matmul rate' if s['device'] == 'cpu' else 'datasheet peak'}).", ""]
    warm, cold = val_curve(f"{o}/pretrain_domain"), val_curve(f"{o}/pretrain_domain_scratch")
    target = cold[max(cold)]
    reached = steps_to_reach(warm, target)
    lines += [f"Domain validation loss, the same steps and batches from both starts. The generic start reaches "
              f"the scratch run's final loss ({target:.4f}) at step {reached} of {max(cold)}"
              + (f" ({max(cold) / reached:.1f}x fewer steps)." if reached else "."), "",
              "| step | from generic | from scratch |", "|---|---|---|"]
    for step in thin(sorted(set(warm) & set(cold))):
        lines.append(f"| {step} | {warm[step]:.4f} | {cold[step]:.4f} |")
    lines.append("")
    return lines


def pct(x):
    return f"{x * 100:.1f}%"


def report_sft(o, timings):
    s = read_json(f"{o}/sft/summary.json")
    h, d = s["heldout_comp"], s["demonstrations"]
    lines = ["## Supervised fine-tuning", "",
             f"Pass@1 on {s['n_eval']} prompts of each split (hidden tests, sandboxed): greedy, and for held-out "
             f"compositions also at T=1 over {s['n_samples']} samples per prompt. Held-out compositions are operation "
             "combinations never seen in training; held-out phrasings are sentence frames never seen in training.", "",
             "| model | held-out compositions, greedy | same, sampled | held-out phrasings | train split (new prompts) |",
             "|---|---|---|---|---|",
             f"| domain model, prompted {s['n_shots']}-shot | {pct(s['few_shot_base']['pass1'])} | | | |",
             f"| SFT | {pct(h['greedy']['pass1'])} | {pct(h['sampled']['pass1'])} | "
             f"{pct(s['heldout_phrase']['greedy']['pass1'])} | {pct(s['train_split']['greedy']['pass1'])} |", "",
             "Unbiased pass@k (Chen et al. 2021) from those samples, and the sample with the highest mean token "
             "log-probability against a random pick:", "",
             "| k | " + " | ".join(str(k) for k in h["pass_at_k"]) + " |", "|---" * (len(h["pass_at_k"]) + 1) + "|",
             "| pass@k | " + " | ".join(pct(v) for v in h["pass_at_k"].values()) + " |", "",
             f"Reranked by mean log-probability: pass@1 {pct(h['pass1_reranked_logp'])}, against "
             f"{pct(h['pass_at_k']['1'])} for a random pick.", "",
             f"Demonstrations: flaw rate {pct(d['flaw_rate'])} (configured {pct(d['flaw_rate_config'])}); they "
             f"pass their tests {pct(d['pass_rate'])} of the time and break a rule {pct(d['violation_rate'])} of "
             f"the time. The SFT model breaks a rule in {pct(h['sampled']['violation_rate'])} of its samples and "
             f"{pct(h['greedy']['violation_rate'])} of its greedy answers.", "",
             f"SFT training {s['train_seconds']:.0f} s, evaluation {s['eval_seconds']:.0f} s "
             f"(stage wall time {timings.get('sft', float('nan')):.0f} s).", ""]
    return lines


def report_reward(o, timings):
    s = read_json(f"{o}/reward/summary.json")
    rows = s["best_of_n"]
    lines = ["## Reward models and best-of-n", "",
             f"{s['n_train_prompts']} training prompts x K={s['k']} SFT samples, ranked by a simulated labeler "
             f"({s['n_train_prompts'] * s['k'] * (s['k'] - 1) // 2} comparisons); {s['n_val_prompts']} prompts held out.",
             "", "| measure | value |", "|---|---|",
             f"| labelers' agreement with the gold utility (non-tied pairs) | {pct(s['labeler_agreement'])} |",
             f"| reward model, held-out pairwise accuracy vs the labelers | {pct(s['val_acc_labeler'])} |",
             f"| reward model, held-out pairwise accuracy vs the gold order | {pct(s['val_acc_gold'])} |"]
    lines += [f"| rule model accuracy vs the gold checker: {rule} | {pct(acc)} |" for rule, acc in s["val_rule_acc"].items()]
    if s["rollouts_per_s"]:
        lines.append(f"| comparison data: SFT samples + sandbox + labels per second | {s['rollouts_per_s']:.1f} |")
    lines += [f"| reward-model training | {s['train_seconds']:.0f} s |", "",
              "Best-of-n on held-out prompts: drop samples the rule model flags, keep the highest preference score.", "",
              "| n | proxy reward (RM) | gold utility | pass@1 | rule violations |", "|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['proxy_reward']:+.3f} | {r['gold_utility']:+.3f} | {pct(r['pass1'])} | "
              f"{pct(r['violation_rate'])} |" for r in rows]
    best_gold = max(rows, key=lambda r: r["gold_utility"])
    if best_gold["n"] < rows[-1]["n"] and rows[-1]["proxy_reward"] > best_gold["proxy_reward"]:
        lines += ["", f"Overoptimization: the proxy reward keeps rising up to n={rows[-1]['n']}, but the gold utility "
                      f"peaks at n={best_gold['n']}."]
    return lines + [""]


def report_ppo(o, timings):
    runs = {name: read_json(f"{o}/{name}/summary.json") for name in ("ppo", "ppo_ptx")}
    bon = read_json(f"{o}/reward/summary.json")["best_of_n"][-1]
    sft, sft_train = runs["ppo"]["sft_heldout_comp"], read_json(f"{o}/sft/summary.json")["train_split"]
    n_prompts, n_samples = len(sft["greedy"]["utilities"]), len(sft["sampled"]["utilities"]) // len(sft["greedy"]["utilities"])
    lines = ["## RLHF with PPO", "",
             f"{n_prompts} held-out-composition prompts, {n_samples} samples each at T=1, judged by the gold judge; "
             "the win rate pits each sample against the SFT model's sample for the same prompt under the noiseless "
             "labeler (ties count half). KL to SFT in nats per response, on the policy's samples (for best-of-n, "
             "the analytic log n - (n-1)/n). Greedy pass@1 on held-out compositions and on new train-split prompts.", "",
             "| policy | gold utility | pass@1 | rule violations | KL to SFT | win rate vs SFT | greedy pass@1 | greedy, train split |",
             "|---|---|---|---|---|---|---|---|",
             f"| SFT | {sft['sampled']['utility']:+.3f} | {pct(sft['sampled']['pass1'])} | "
             f"{pct(sft['sampled']['violation_rate'])} | 0 | 50% | {pct(sft['greedy']['pass1'])} | "
             f"{pct(sft_train['greedy']['pass1'])} |",
             f"| best-of-{bon['n']} (SFT samples) | {bon['gold_utility']:+.3f} | {pct(bon['pass1'])} | "
             f"{pct(bon['violation_rate'])} | {math.log(bon['n']) - (bon['n'] - 1) / bon['n']:.2f} | | | |"]
    for name, s in runs.items():
        h = s["heldout_comp"]
        lines.append(f"| {'PPO-ptx' if s['ptx_coef'] else 'PPO'} (ptx {s['ptx_coef']}) | {h['sampled']['utility']:+.3f} | "
                     f"{pct(h['sampled']['pass1'])} | {pct(h['sampled']['violation_rate'])} | {s['kl_to_sft']:.2f} | "
                     f"{pct(s['win_rate_vs_sft'])} | {pct(h['greedy']['pass1'])} | {pct(s['train_split']['greedy']['pass1'])} |")
    lines += ["", "Generic-text validation loss (what PPO-ptx protects):", "",
              "| run | before PPO (the SFT model) | after PPO |", "|---|---|---|"]
    lines += [f"| {name} | {s['generic_val_loss_before']:.4f} | {s['generic_val_loss_after']:.4f} |" for name, s in runs.items()]
    log = [r for r in read_log(f"{o}/ppo/log.jsonl") if "score" in r]
    lines += ["", "PPO training curves (rollout batch means):", "",
              "| iteration | score | RM score | KL | response length | ended | clip frac | explained var |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['score']:+.3f} | {r['rm_score']:+.3f} | {r['kl']:.3f} | {r['response_len']:.1f} | "
              f"{pct(r['ended'])} | {r['clip_frac']:.3f} | {r['explained_var']:+.2f} |" for r in thin(log)]
    t = runs["ppo"]["seconds"]
    total = sum(t.values())
    lines += ["", f"PPO time: {runs['ppo']['iterations']} iterations, {runs['ppo']['episodes']} episodes in "
                  f"{total:.0f} s ({runs['ppo']['iterations'] / total:.2f} it/s): rollout {pct(t['rollout'] / total)}, "
                  f"scoring {pct(t['score'] / total)}, update {pct(t['update'] / total)}.", ""]
    return lines


def thin(rows, n=8):
    """About n evenly spaced rows, always with the last."""
    stride = max(1, len(rows) // n)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


def report_headline(o):
    """The seed's claims in miniature, each with what this run measured and whether it held."""
    warm, cold = val_curve(f"{o}/pretrain_domain"), val_curve(f"{o}/pretrain_domain_scratch")
    reached = steps_to_reach(warm, cold[max(cold)])
    sft, reward = read_json(f"{o}/sft/summary.json"), read_json(f"{o}/reward/summary.json")
    ppo, ptx = read_json(f"{o}/ppo/summary.json"), read_json(f"{o}/ppo_ptx/summary.json")
    h = sft["heldout_comp"]
    ks = list(h["pass_at_k"].values())
    bon = {r["n"]: r for r in reward["best_of_n"]}
    n_max, n_best = max(bon), max(bon, key=lambda n: bon[n]["gold_utility"])
    base, ours = ppo["sft_heldout_comp"]["sampled"], ppo["heldout_comp"]["sampled"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    rows = [
        ("further pretraining from a generic model converges faster than from scratch (Codex)",
         f"domain val loss after {max(cold)} steps {warm[max(warm)]:.3f} vs {cold[max(cold)]:.3f}; the generic start "
         f"reaches the scratch run's final loss at step {reached}", reached is not None and reached < max(cold)),
        ("fine-tuning beats prompting (GPT-3 vs fine-tuning, Codex-S)",
         f"held-out pass@1, greedy: SFT {pct(h['greedy']['pass1'])} vs the domain model prompted "
         f"{sft['n_shots']}-shot {pct(sft['few_shot_base']['pass1'])}", h["greedy"]["pass1"] > sft["few_shot_base"]["pass1"]),
        ("pass@k rises with k; reranking by mean log-probability beats a random pick (Codex)",
         f"pass@1 {pct(ks[0])} -> pass@{len(ks)} {pct(ks[-1])}; reranked {pct(h['pass1_reranked_logp'])} vs "
         f"random {pct(ks[0])}", all(a < b for a, b in zip(ks, ks[1:])) and h["pass1_reranked_logp"] > ks[0]),
        ("a reward model learns human comparisons (InstructGPT)",
         f"held-out pairwise accuracy {pct(reward['val_acc_labeler'])} vs the labelers, {pct(reward['val_acc_gold'])} "
         f"vs the gold order; labelers agree with the gold on {pct(reward['labeler_agreement'])}",
         reward["val_acc_gold"] > 0.5),
        ("RLHF beats SFT on what people prefer (InstructGPT)",
         f"win rate {pct(ppo['win_rate_vs_sft'])}; gold utility {base['utility']:+.3f} -> {ours['utility']:+.3f}; "
         f"pass@1 {pct(base['pass1'])} -> {pct(ours['pass1'])}; KL {ppo['kl_to_sft']:.2f} nats",
         ppo["win_rate_vs_sft"] > 0.5 and ours["utility"] > base["utility"]),
        ("mixing pretraining updates limits the regression on generic text (PPO-ptx)",
         f"generic val loss after PPO {ppo['generic_val_loss_after']:.3f}, after PPO-ptx "
         f"{ptx['generic_val_loss_after']:.3f} (SFT: {ppo['generic_val_loss_before']:.3f})",
         ptx["generic_val_loss_after"] < ppo["generic_val_loss_after"]),
        ("rule reward models and reranking cut rule violations (Sparrow, LaMDA)",
         f"samples breaking a rule: SFT {pct(base['violation_rate'])}, best-of-{n_max} "
         f"{pct(bon[n_max]['violation_rate'])}, PPO {pct(ours['violation_rate'])}",
         bon[n_max]["violation_rate"] < base["violation_rate"] and ours["violation_rate"] < base["violation_rate"]),
        ("more samples reranked by a reward model help, then overoptimize (Gao et al.)",
         "gold utility by n: " + ", ".join(f"{n}: {r['gold_utility']:+.3f}" for n, r in bon.items())
         + f"; the proxy rises to {bon[n_max]['proxy_reward']:+.3f}",
         bon[min(bon) * 2]["gold_utility"] > bon[min(bon)]["gold_utility"] and n_best < n_max),
    ]
    lines = ["## The claims, in miniature", "", "| claim | measured | holds |", "|---|---|---|"]
    lines += [f"| {claim} | {measured} | {yes(ok)} |" for claim, measured, ok in rows]
    return lines + [""]


def write_report(args, timings):
    o = args.out_dir
    lines = ["# Report", "",
             f"Written by `python run.py --preset {args.preset}` on {time.strftime('%Y-%m-%d')}; "
             f"total stage wall time {sum(timings.values()) / 60:.1f} min.", ""]
    lines += report_headline(o) + report_pretraining(o, timings) + report_sft(o, timings) + report_reward(o, timings) + report_ppo(o, timings)
    path = os.path.join(o, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=["quick", "cpu", "gpu"], help="preset for every stage")
    parser.add_argument("--out_dir", default="out", help="every stage writes under this folder")
    parser.add_argument("--ptx_coef", type=float, default=1.0, help="pretraining-loss weight of the PPO-ptx run")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    timings_path = os.path.join(args.out_dir, "timings.json")
    timings = read_json(timings_path) if os.path.exists(timings_path) else {}
    for name, command in stage_commands(args):
        summary = os.path.join(args.out_dir, name, "summary.json")
        if os.path.exists(summary):
            print(f"== {name}: done already ({summary})")
            continue
        print(f"== {name}: python {' '.join(command)}", flush=True)
        resumed = os.path.isdir(os.path.join(args.out_dir, name))  # a stage interrupted before: its time adds up
        t0 = time.time()
        subprocess.run([sys.executable, *command], check=True)
        timings[name] = (timings.get(name, 0.0) if resumed else 0.0) + time.time() - t0
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
    write_report(args, timings)
