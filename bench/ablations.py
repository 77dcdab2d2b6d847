"""
What each change to the GPT buys at this size, at equal wall time on this machine: the ablation
behind model.GPTConfig's fields, Muon and the copy-teaching data. Writes docs/ABLATIONS.md.

    python data.py                          # once: the default corpora and tokenizer, under out/
    python bench/ablations.py               # every row at the full budget, the decisive ones on three seeds
    python bench/ablations.py --budget 0.5 --seeds 1    # docs/ABLATIONS.md as committed: 36 min on two cores
    python bench/ablations.py --rows 0 8 --seeds 1 --budget 0.2     # a quick look

Each row adds one change to the row above (cumulative, like modded-nanogpt's record table), then a
few rows take one change back out of the final recipe. Every row trains generic then domain
pretraining (pretrain.py, the cpu preset's shape and data, two threads) for the same wall time:
the wall time today's GPT takes for the cpu preset's steps, generic and domain. The steps a row gets are
that budget over its own step time, measured here before it trains, so a change that costs time
pays for it in steps. Every row uses the same tokenizer, so losses compare. Decisive comparisons run
on several seeds; their intervals are over seeds (min to max) and, for one seed, a 95% bootstrap
over the validation batches.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import SPECIAL_TOKENS, get_batch, load_tokenizer, load_tokens  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from pretrain import MODEL_FLAGS, PRESETS  # noqa: E402

TODAY = dict(rotary=0, key_offset=0, qk_norm=0, relu2=0, untied_head=0, zero_init=0, matrix_lr=0, lr=2e-3,
             copy_share=0)
# (name, what it changes, source); each row is the row above plus its change
CUMULATIVE = [
    ("today's GPT (GPT-2 layout, AdamW)", {}, "Radford et al. 2019; nanoGPT"),
    ("+ rotary positions", dict(rotary=1), "Su et al. 2021"),
    ("+ QK-norm", dict(qk_norm=1), "Dehghani et al. 2023; nanochat"),
    ("+ ReLU^2", dict(relu2=1), "So et al. 2021 (Primer)"),
    ("+ zero-init projections", dict(zero_init=1), "nanochat, modded-nanogpt"),
    ("+ Muon for the matrices", dict(matrix_lr=0.02, lr=6e-3), "Jordan et al. 2024"),
    ("+ key offset", dict(key_offset=1), "modded-nanogpt; Olsson et al. 2022"),
    ("+ copy-teaching spans", dict(copy_share=0.25), "Olsson et al. 2022; Bi-Induct 2025"),
]
FINAL = {k: v for _, change, _ in CUMULATIVE for k, v in change.items()}
LEAVE_OUT = [  # the final recipe with one change taken back out, or one more that was tried and left out
    ("final + untied head (left out)", dict(untied_head=1)),
    ("final - Muon", dict(matrix_lr=0, lr=2e-3)),
    ("final - key offset", dict(key_offset=0)),
    ("final - copy-teaching spans", dict(copy_share=0)),
    ("final - QK-norm", dict(qk_norm=0)),
]
LEFT_OUT_UNTRIED = [  # candidates with no row, and why
    ("logit soft-capping (Gemma 2, nanochat)", "guards long, large-learning-rate runs against logits that grow; "
     "these runs are 300 steps with gradient norms near 1, nothing for it to catch"),
    ("value embeddings (modded-nanogpt, nanochat)", "a vocabulary-sized table per layer: in a 4-layer, "
     "128-channel model that is 4 x 0.5M parameters beside 0.8M in the blocks"),
    ("a learned smeared-key gate (Olsson et al. 2022)", "tried before this ablation with learned positions: "
     "0.0% induction at 300 steps (shared notes, copy-probes); the fixed key offset on half of each head does it"),
    ("a pointer-generator copy head (See et al. 2017)", "the fallback the issue allows if no recipe formed "
     "induction; the recipe does, so the GPT keeps one output head"),
]
DECISIVE = (0, 7, 10, 11)  # today's, the final recipe, and the two changes the copying rests on taken out
STEPS = PRESETS["cpu"]["max_steps"]  # the cpu preset's steps per stage: today's GPT sets the budget with them


def rows():
    settings, out = dict(TODAY), []
    for name, change, source in CUMULATIVE:
        settings = {**settings, **change}
        out.append((name, dict(settings), source))
    for name, change in LEAVE_OUT:
        out.append((name, {**TODAY, **FINAL, **change}, ""))
    return out


def step_seconds(settings, data, enc, threads, n=12):
    """Median time of one training step of this row's model and optimizer, after two warm-up steps."""
    torch.set_num_threads(threads)
    p = PRESETS["cpu"]
    config = GPTConfig(**{k: p[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, vocab_size=enc.n_vocab,
                       **{k: bool(settings[k]) for k in MODEL_FLAGS if k in settings})
    model = GPT(config)
    opt = model.configure_optimizers(settings["lr"], 0.1, (0.9, 0.95), "cpu", matrix_lr=settings["matrix_lr"] or None)
    rng, times = torch.Generator().manual_seed(0), []
    for _ in range(n + 2):
        x, y = get_batch(data, p["batch_size"], p["block_size"], rng, torch.device("cpu"),
                         (settings["copy_share"], 5, 60, enc.n_vocab - len(SPECIAL_TOKENS)))
        t0 = time.perf_counter()
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def pretrain(settings, steps, data, init_from, out_dir, seed, threads):
    """One pretrain.py run as a user runs it; its summary. Its output goes to out_dir/stdout.log."""
    if os.path.exists(os.path.join(out_dir, "summary.json")):  # done in an earlier, interrupted ablation
        with open(os.path.join(out_dir, "summary.json")) as f:
            return json.load(f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    flags = [f"--{k}={v}" for k, v in settings.items() if not (init_from and k in MODEL_FLAGS)]
    command = [sys.executable, "pretrain.py", "--preset", "cpu", "--data", data, "--tokenizer", args.tokenizer,
               "--out_dir", out_dir, "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 10)),
               "--seed", str(seed), "--eval_interval", str(steps), *flags] + (["--init_from", init_from] if init_from
                                                                             else [])
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                       stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def bootstrap(values, n=1000):
    g = torch.Generator().manual_seed(0)
    v = torch.tensor(values)
    means = v[torch.randint(len(v), (n, len(v)), generator=g)].mean(1).sort().values
    return means[int(0.025 * n)].item(), means[int(0.975 * n) - 1].item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="out/data", help="folder with generic/ and domain/ token files (data.py)")
    parser.add_argument("--tokenizer", default="out/tokenizer.json")
    parser.add_argument("--out_dir", default="out/ablations", help="each row's runs go here")
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="row indices (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the decisive rows (others: one)")
    parser.add_argument("--budget", type=float, default=1.0, help="share of the wall-time budget (for a quick look)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", default="docs/ABLATIONS.md")
    args = parser.parse_args()

    enc = load_tokenizer(os.path.join(ROOT, args.tokenizer))
    generic, domain = (os.path.join(args.data, name) for name in ("generic", "domain"))
    train = load_tokens(os.path.join(ROOT, generic), "train", enc)
    table = rows()
    chosen = range(len(table)) if args.rows is None else args.rows
    t_today = step_seconds(table[0][1], train, enc, args.threads)
    budget = STEPS * t_today * args.budget  # seconds of training per stage, as today's GPT spends them
    print(f"budget: {budget:.0f} s of training per stage ({STEPS} steps of today's GPT at {t_today * 1000:.0f} ms)")
    results = {}
    for i in chosen:
        name, settings, _ = table[i]
        t_step = step_seconds(settings, train, enc, args.threads)
        steps = max(10, round(budget / t_step))
        for seed in range(args.seeds if i in DECISIVE else 1):
            run = os.path.join(ROOT, args.out_dir, f"row{i}_{steps}steps_seed{seed}")
            g = pretrain(settings, steps, generic, None, os.path.join(run, "generic"), 1337 + seed, args.threads)
            d = pretrain(settings, steps, domain, os.path.join(run, "generic", "ckpt.pt"), os.path.join(run, "domain"),
                         1337 + seed, args.threads)
            results.setdefault(i, []).append(dict(steps=steps, tok_per_s=4096 / t_step, generic=g, domain=d))
            print(f"row {i} seed {seed}: {name}: {steps} steps | domain val {d['val_loss']:.4f} | induction "
                  f"{statistics.fmean(d['induction']['all']):.1%}", flush=True)

    def cell(i):
        runs = results[i]
        losses = [r["domain"]["val_loss"] for r in runs]
        if len(runs) > 1:
            return f"{statistics.fmean(losses):.3f} [{min(losses):.3f}, {max(losses):.3f}]"
        lo, hi = bootstrap(runs[0]["domain"]["val_losses"])
        return f"{losses[0]:.3f} [{lo:.3f}, {hi:.3f}]"

    def pct(i, stage, pool):
        return f"{statistics.fmean(statistics.fmean(r[stage]['induction'][pool]) for r in results[i]):.1%}"

    lines = ["# Ablations: what each change buys, at equal wall time", "",
             f"Written by `python bench/ablations.py` on {time.strftime('%Y-%m-%d')}: the cpu preset's shape (4 layers, "
             f"128 channels, 4 heads, context 256) and default data, {args.threads} threads, each row trained generic "
             f"then domain pretraining for {budget:.0f} s of training each ({STEPS} steps of today's GPT at "
             f"{t_today * 1000:.0f} ms a step{'' if args.budget == 1 else f', {args.budget:.0%} of the budget'}). "
             "Each cumulative row adds one change to the row above; the last rows take one change back out of the "
             "final recipe. Domain validation loss over the same 16 validation batches; its interval is over seeds "
             "(min to max) where a row ran on several, else a 95% bootstrap over the batches. The induction test "
             "(Olsson et al. 2022): a sequence of 50 random ordinary tokens followed by itself, the share of the "
             "repeat predicted top-1, over 4 draws of 32 sequences (all: any ordinary token; frequent: the corpus's "
             "256 most frequent).", "",
             "| row | change | source | tokens/s | steps per stage | seeds | domain val loss | induction after "
             "generic (all) | after domain (all / frequent) |", "|---|---|---|---|---|---|---|---|---|"]
    for i in sorted(results):
        name, _, source = table[i]
        r = results[i][0]
        lines.append(f"| {i} | {name} | {source} | {r['tok_per_s']:,.0f} | {r['steps']} | {len(results[i])} | "
                     f"{cell(i)} | {pct(i, 'generic', 'all')} | {pct(i, 'domain', 'all')} / "
                     f"{pct(i, 'domain', 'frequent')} |")
    lines += ["", "Candidates with no row, and why:", ""] + [f"- {name}: {why}." for name, why in LEFT_OUT_UNTRIED]
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.report)), exist_ok=True)
    with open(os.path.join(ROOT, args.report), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(ROOT, args.out_dir, "results.json"), "w") as f:
        json.dump(dict(budget=budget, t_today=t_today, results=results), f)
    print(f"wrote {args.report}")
