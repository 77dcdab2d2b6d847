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
    steps = sorted(set(warm) & set(cold))
    shown = steps[::max(1, len(steps) // 8)]
    for step in shown + ([steps[-1]] if shown[-1] != steps[-1] else []):
        lines.append(f"| {step} | {warm[step]:.4f} | {cold[step]:.4f} |")
    return lines


def write_report(args, timings):
    o = args.out_dir
    lines = ["# Report", "",
             f"Written by `python run.py --preset {args.preset}` on {time.strftime('%Y-%m-%d')}; "
             f"total stage wall time {sum(timings.values()) / 60:.1f} min.", ""]
    lines += report_pretraining(o, timings)
    path = os.path.join(o, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=["quick", "cpu", "gpu"], help="preset for every stage")
    parser.add_argument("--out_dir", default="out", help="every stage writes under this folder")
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
        t0 = time.time()
        subprocess.run([sys.executable, *command], check=True)
        timings[name] = timings.get(name, 0.0) + time.time() - t0  # a resumed stage adds its time
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
    write_report(args, timings)
