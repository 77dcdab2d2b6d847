"""
The whole pipeline in one command: each stage runs its own script in a subprocess, exactly as you
would by hand (two at a time where the graph allows, each on its share of the cores); the last,
report.py, writes REPORT.md from what the others logged and summarized.

    pip install -r requirements.txt && python run.py              # the cpu preset
    python run.py --extended                                      # and the RL variants past the budget
    python run.py --preset quick                                  # every stage, small and fast
    python run.py --preset gpu --out_dir out_gpu                  # GPT-2 small on one GPU
    python run.py --preset gpu --rehearse                         # the same, a few steps a stage, on a CPU

Re-running skips every stage whose outputs are complete (a summary that parses, a finished
checkpoint); an interrupted stage resumes from its checkpoint. Delete a stage's folder to rerun it.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from common import write_json

PPO_RUNS = {  # name: (ppo.py flags, in the default run); settings chosen on dev prompts, see the README
    "ppo": ([], True),
    "ppo_ptx": (["--ptx_coef", "1"], True),
    "grpo_tests": (["--reward", "tests", "--advantage", "grpo", "--group_size", "4"], False),
    "ppo_tests": (["--reward", "tests"], False),
    "ppo_both": (["--reward", "both"], False),
    "ppo_adaptive_kl": (["--kl_target", "0.5", "--kl_horizon", "640"], False),
    "ppo_dev_beta0.05": (["--beta", "0.05", "--eval_set", "dev"], False),
    "ppo_dev_beta0.15": (["--eval_set", "dev"], False),
    # Sparrow's preference for supported answers, from the gold judge: GRPO on the factual questions, tools at hand;
    # no rule term: the rules are about code, and under GRPO the rule model's small differences between answers the
    # judge scores alike would be divided by the group's spread into full-size advantages
    "evidence_rl": (["--reward", "evidence", "--advantage", "grpo", "--group_size", "4", "--rule_coef", "0",
                     "--docs_index", "{out}/docs/index.json"], False),
}
EXAMPLE_TASKS = ("test:0", "test:1", "test:2",  # the held-out requests the report shows every model answering,
                 "followup:1", "followup:2", "probe:5")  # and conversations: an extension, a reported failure, the
# first probe split over two turns
DIALOGUE_SETS = ("followup", "probe", "test")  # best-of-n judged on them (--extended), for the dialogue table
# --rehearse: every stage for a few steps at the preset's shapes and on its data, through the GPU's code paths
# (bf16 autocast; pretraining compiled) on whatever machine runs it, so that a crash at the gpu preset's shapes
# shows up on a CPU before a card is paid for. Batches shrink to a few sequences (two micro-steps of 2 x 1024
# tokens keep gradient accumulation): a batch of 32 x 1024 tests the card's memory, which a CPU cannot tell.
# SFT and PPO judge the same 4 test prompts: PPO meets SFT's samples prompt by prompt.
REHEARSAL = {"pretrain.py": ["--max_steps", "2", "--batch_size", "2", "--total_batch_tokens", "4096",
                             "--eval_batches", "1", "--dtype", "bfloat16", "--compile", "1"],
             "sft.py": ["--max_steps", "2", "--batch_size", "8", "--n_eval", "4", "--n_samples", "4",
                        "--n_fact_eval", "4", "--dtype", "bfloat16"],
             "reward.py": ["--n_prompts", "16", "--best_of", "1", "2", "4", "--dtype", "bfloat16"],
             "ppo.py": ["--iterations", "2", "--rollout_batch", "8", "--minibatch", "4", "--n_eval", "4",
                        "--eval_samples", "2", "--n_fact_eval", "4", "--dtype", "bfloat16"]}
# Galactica's lessons (--extended; galactica.py, report.report_galactica). batch_tokens: pretrain.PRESETS'; cpu's
# SFT: 300 steps on 7200 + 2400 demonstrations (the default's 1000 on 24000 + 8000), to afford four; gpu: the curated
# subset is the standard library's (1.2M tokens documented), so an epoch is 8 steps
# arithmetic: galactica.py's arithmetic.jsonl (questions, held-out ones) and the SFT that learns it: at cpu, four
# passes (measured: one pass learns the working's format and none of its sums, on either tokenizer)
GALACTICA = {
    "quick": dict(epoch_steps=10, batch_tokens=1024, small="--n_layer 1 --n_head 2 --n_embd 32", sft="--n_samples 1",
                  arithmetic="--n_arithmetic 320 --n_arithmetic_eval 12", arithmetic_sft="--max_steps 10"),
    "cpu": dict(epoch_steps=30, batch_tokens=4096, small="--n_layer 2 --n_head 3 --n_embd 96",
                sft="--max_steps 300 --eval_interval 100 --n_train 7200 --n_facts 2400 --n_samples 1 --n_fact_eval 8",
                arithmetic="--n_arithmetic 19200 --n_arithmetic_eval 300", arithmetic_sft="--max_steps 2400"),
    "gpu": dict(epoch_steps=8, batch_tokens=2**17, small="--n_layer 4 --n_head 4 --n_embd 256", sft="--n_samples 1",
                arithmetic="--n_arithmetic 19200 --n_arithmetic_eval 300", arithmetic_sft="--max_steps 2400")}
EPOCHS = 4  # Galactica's 4.25 epochs (Taylor et al. 2022, sec. 5)


def galactica_stages(args, out, preset, tok, sft, data):
    """The --extended stages of report.report_galactica (sft's own --init_from comes last and wins)."""
    g, pretrain = GALACTICA[args.preset], ["pretrain.py", *preset, *tok]
    epochs = ["--max_steps", str(EPOCHS * g["epoch_steps"]), "--warmup_steps", str(EPOCHS * g["epoch_steps"] // 10),
              "--eval_interval", str(g["epoch_steps"])]
    generic, small = (["--init_from", f"{out}/{n}/ckpt.pt"] for n in ("pretrain_generic", "galactica_small_generic"))
    mixed = ["--data", f"{out}/galactica_data/prompts"]
    domain = ("pretrain_domain", "galactica_prompts", "galactica_small_domain", "galactica_small_prompts")
    arithmetic = []  # working memory, with each tokenizer: arithmetic by three roads, learned by a scratch model
    for name, parent, tokenizer in (("arithmetic", "pretrain_domain_scratch", f"{out}/tokenizer.json"), (
            "digits_arithmetic", "galactica_digits_scratch", f"{out}/galactica_digits/tokenizer.json")):
        arithmetic += [
            (f"galactica_{name}", ["galactica_data", parent], [
                *sft, *g["arithmetic_sft"].split(), "--replay_batch", "0", "--demos",
                f"{out}/galactica_data/arithmetic.jsonl", "--tokenizer", tokenizer, "--init_from",
                f"{out}/{parent}/ckpt.pt", "--out_dir", f"{out}/galactica_{name}"]),
            (f"galactica_{name}_eval", [f"galactica_{name}"], [
                "galactica.py", "--tokenizer", tokenizer, "--docs_index", f"{out}/docs/index.json",
                *g["arithmetic"].split(), "--arithmetic", f"{out}/galactica_{name}/ckpt.pt", "--out_dir",
                f"{out}/galactica_{name}_eval"])]
    return [
        ("galactica_data", ["data", "docs"], [
            "galactica.py", *tok, "--domain_data", f"{out}/data/domain", "--docs_index", f"{out}/docs/index.json",
            "--curated_tokens", str(g["epoch_steps"] * g["batch_tokens"]), *g["arithmetic"].split(),
            "--out_dir", f"{out}/galactica_data"]),
        ("galactica_curated", ["galactica_data", "pretrain_generic"], [
            *pretrain, *generic, *epochs, "--data", f"{out}/galactica_data/curated", "--out_dir",
            f"{out}/galactica_curated"]),
        ("galactica_fresh", ["pretrain_generic"], [*pretrain, *generic, *epochs, "--data", f"{out}/data/domain",
                                                   "--out_dir", f"{out}/galactica_fresh"]),
        ("galactica_prompts", ["galactica_data", "pretrain_generic"], [*pretrain, *generic, *mixed, "--out_dir",
                                                                       f"{out}/galactica_prompts"]),
        ("galactica_small_generic", ["data"], [*pretrain, *g["small"].split(), "--data", f"{out}/data/generic",
                                               "--out_dir", f"{out}/galactica_small_generic"]),
        ("galactica_small_domain", ["galactica_small_generic"], [*pretrain, *small, "--data", f"{out}/data/domain",
                                                                 "--out_dir", f"{out}/galactica_small_domain"]),
        ("galactica_small_prompts", ["galactica_small_generic", "galactica_data"], [
            *pretrain, *small, *mixed, "--out_dir", f"{out}/galactica_small_prompts"]),
        *[(f"galactica_sft{name}", [parent, "docs"], [*sft, *g["sft"].split(), "--init_from", f"{out}/{parent}/ckpt.pt",
                                                      "--out_dir", f"{out}/galactica_sft{name}"])
          for name, parent in (("", "pretrain_domain"), ("_prompts", "galactica_prompts"),
                               ("_small", "galactica_small_domain"), ("_small_prompts", "galactica_small_prompts"))],
        ("galactica_zero_shot", list(domain), ["galactica.py", *tok, "--zero_shot",
                                               *[f"{out}/{n}/ckpt.pt" for n in domain], "--out_dir",
                                               f"{out}/galactica_zero_shot"]),
        # data.py writes its summary under out_dir/data, as for the default's "data" stage
        ("galactica_digits/data", [], ["data.py", "--split_digits", *data[3:], "--out_dir", f"{out}/galactica_digits"]),
        ("galactica_digits_scratch", ["galactica_digits/data"], [  # against pretrain_domain_scratch
            "pretrain.py", *preset, "--tokenizer", f"{out}/galactica_digits/tokenizer.json", "--data",
            f"{out}/galactica_digits/data/domain", "--out_dir", f"{out}/galactica_digits_scratch"]),
        *arithmetic,
    ]


def stage_graph(args):
    """(folder, the stages it needs, script and arguments) for every stage, in a runnable order."""
    out, preset = args.out_dir, ["--preset", args.preset]
    tok = ["--tokenizer", f"{out}/tokenizer.json"]
    data = ["data.py", "--out_dir", out] + {"quick": ["--max_chars", "2000000", "--vocab_size", "2048"], "cpu": [],
                                             "gpu": ["--corpus", "installed", "--block_size", "1024"]}[args.preset]
    sft = ["sft.py", *preset, *tok, "--init_from", f"{out}/pretrain_domain/ckpt.pt", "--docs_index",
           f"{out}/docs/index.json", "--replay_data", f"{out}/data/domain"]
    stages = [
        ("data", [], data),
        ("docs", [], ["tools.py", "--out_dir", f"{out}/docs"]),
        ("pretrain_generic", ["data"], ["pretrain.py", *preset, *tok, "--data", f"{out}/data/generic",
                                        "--out_dir", f"{out}/pretrain_generic"]
         + (["--max_steps", "100"] if args.preset == "gpu" else [])),  # the generic prose is 4x smaller
        # the baseline needs only the data; it waits for the generic run so that the generic run, on the path to
        # every later stage, has all the cores, and the two domain runs then train side by side
        ("pretrain_domain_scratch", ["pretrain_generic"], ["pretrain.py", *preset, *tok, "--data",
                                                           f"{out}/data/domain", "--out_dir",
                                                           f"{out}/pretrain_domain_scratch"]),
        ("pretrain_domain", ["pretrain_generic"], ["pretrain.py", *preset, *tok, "--data", f"{out}/data/domain",
                                                   "--init_from", f"{out}/pretrain_generic/ckpt.pt",
                                                   "--out_dir", f"{out}/pretrain_domain"]),
        # SFT also waits for the baseline, which ends with it, so that it has both cores from its first step
        ("sft", ["pretrain_domain", "pretrain_domain_scratch", "docs"], [*sft, "--out_dir", f"{out}/sft"]),
        ("reward", ["sft"], ["reward.py", *preset, *tok, "--sft", f"{out}/sft/ckpt.pt", "--out_dir", f"{out}/reward"]),
        # the toolset's baseline: the same factual demonstrations answered closed-book, without the programming
        # ones (one pass over them). It waits for SFT, which then has both cores, and trains beside the reward
        # stage, a core each, so that the RL runs after them have a core each to the end
        ("sft_closed_book", ["sft"], [*sft, "--tools", "0", "--eval", "facts", "--n_train", "0", "--epochs", "1",
                                      "--out_dir", f"{out}/sft_closed_book"]),
    ]
    if args.extended:  # Galactica's lessons first (the longest chain), then the control for the toolset's cost: the
        stages += galactica_stages(args, out, preset, tok, sft, data)  # same SFT budget, all of it programming
        stages.append(("sft_code_only", ["pretrain_domain", "docs"], [*sft, "--n_facts", "0", "--n_train", "32000",
                                                                      "--out_dir", f"{out}/sft_code_only"]))
        # the control for the replay: what fine-tuning does to copying without it
        stages.append(("sft_no_replay", ["pretrain_domain", "docs"], [*sft, "--replay_batch", "0",
                                                                      "--out_dir", f"{out}/sft_no_replay"]))
    for name, (flags, default) in PPO_RUNS.items():
        if default or args.extended:
            stages.append((name, ["reward"], ["ppo.py", *preset, *tok, "--sft", f"{out}/sft/ckpt.pt", "--reward_dir",
                                              f"{out}/reward", "--generic_data", f"{out}/data/generic",
                                              "--out_dir", f"{out}/{name}", *[f.format(out=out) for f in flags]]))
    if args.extended:  # best-of-n on the SFT model (chat.py's column) over the follow-ups, probes and test requests
        n = {"quick": 4}.get(args.preset, 100)
        stages.append(("best_of_dialogue", ["reward"], [
            "chat.py", "--models", f"{out}/sft", "--reward_dir", f"{out}/reward", "--best_of", "16", "--temperature",
            "0", *[a for s in DIALOGUE_SETS for i in range(n) for a in ("--task", f"{s}:{i}")], "--json",
            f"{out}/best_of_dialogue/summary.json", "--tokenizer", f"{out}/tokenizer.json"]))
    rl_models = [name for name, (_, default) in PPO_RUNS.items() if default]
    models = [f"{out}/{name}" for name in ("pretrain_domain", "sft", *rl_models)]
    quick = ["--best_of", "4", "--max_tokens", "48"] if args.preset == "quick" else ["--best_of", "16"]  # the tests' time
    stages.append(("examples", rl_models, [
        "chat.py", "--models", *models, "--reward_dir", f"{out}/reward", *quick, "--temperature", "0",
        *[a for t in EXAMPLE_TASKS for a in ("--task", t)], "--json", f"{out}/examples/summary.json", "--tokenizer",
        f"{out}/tokenizer.json"]))
    if args.rehearse:  # the rehearsal's flags last: where a stage's own flags say otherwise, these win
        stages = [(name, needs, command + REHEARSAL.get(command[0], [])) for name, needs, command in stages]
    # the report, last: it reads every other stage's folder (it writes no summary, so it runs every time)
    stages.append(("report", [name for name, _, _ in stages], [
        "report.py", "--out_dir", out, *preset, "--jobs", str(args.jobs), *["--extended"] * args.extended,
        *["--rehearse"] * args.rehearse, "--extended_runs", *[name for name, (_, default) in PPO_RUNS.items()
                                                               if not default]]))
    return stages


def read_json(path):
    with open(path) as f:
        return json.load(f)


def stage_done(folder):
    """Complete outputs: a summary that parses and, where the stage checkpoints, a finished checkpoint
    (a run killed while writing its summary leaves neither a half summary nor a false 'done')."""
    try:
        read_json(os.path.join(folder, "summary.json"))
    except (OSError, ValueError):
        return False
    ckpt = os.path.join(folder, "ckpt.pt")
    return not os.path.exists(ckpt) or torch.load(ckpt, map_location="cpu", weights_only=True).get("finished", True)


def share_cores(running, out):
    """Each running stage's share of the cores, in its folder's `threads` file: a stage that outlives its
    neighbour takes the freed core between two of its steps (common.follow_core_share)."""
    for name in running:
        write_json(os.path.join(out, name, "threads"), max(1, (os.cpu_count() or 1) // len(running)))


def run_stages(stages, done, out, jobs, timings, wall):
    """Run the stages not in `done`, up to `jobs` at a time, each as soon as the stages it needs are
    done (each is added to `done` as it finishes). With more than one at a time, each writes its
    output to its folder's stdout.log and gets its share of the cores. As each stage ends, its time
    (timings, by stage) and the run's wall time (from wall, the earlier invocations' share) are written
    to the run's folder, where the report, the last stage, reads them."""
    t_start = time.time() - wall
    for name in sorted(done):
        print(f"== {name}: done already")
    pending, running = [s for s in stages if s[0] not in done], {}
    while pending or running:
        ready = [s for s in pending if all(d in done for d in s[1])]
        for name, _, command in ready[:max(0, jobs - len(running))]:
            pending.remove(next(s for s in pending if s[0] == name))
            folder = os.path.join(out, name)
            os.makedirs(folder, exist_ok=True)
            threads = max(1, (os.cpu_count() or 1) // min(jobs, len(running) + len(ready)))
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), RUN_THREADS_FILE=os.path.join(folder, "threads"))
            log = None if jobs == 1 else open(os.path.join(folder, "stdout.log"), "a")
            print(f"== {name}: python {' '.join(command)}" + (f"  (log: {folder}/stdout.log)" if log else ""),
                  flush=True)
            proc = subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT if log
                                    else None)
            running[name] = (proc, time.time(), log)
            share_cores(running, out)
        time.sleep(0.2)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if log:
                log.close()
            resumed = name in timings  # a stage interrupted before: its time adds up
            timings[name] = (timings[name] if resumed else 0.0) + time.time() - t0
            write_json(os.path.join(out, "timings.json"), timings)
            write_json(os.path.join(out, "wall_time.json"), dict(seconds=time.time() - t_start))
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.send_signal(2)  # Ctrl-C: the others save their checkpoints and stop
                raise SystemExit(f"stage {name} failed (exit code {proc.returncode})" +
                                 (f"; its output is in {out}/{name}/stdout.log" if log else ""))
            done.add(name)
            share_cores(running, out)
            print(f"== {name}: done in {timings[name]:.0f} s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=["quick", "cpu", "gpu"], help="preset for every stage")
    parser.add_argument("--rehearse", action="store_true", help="every stage for a few steps at the preset's shapes, "
                        "on its data, with bf16 autocast and compiled pretraining, on any machine (see REHEARSAL)")
    parser.add_argument("--out_dir", default=None, help="every stage writes under this folder (default: out, or "
                        "out_rehearse with --rehearse, so that a rehearsal's stages never pass for a run's)")
    parser.add_argument("--extended", action="store_true", help="also the runs past the default's time budget: "
                        "PPO on the tests, on RM + tests, the adaptive KL controller, the dev runs that chose beta, "
                        "GRPO on the factual questions' evidence, SFT's controls, best-of-n in dialogue, Galactica's "
                        "lessons")
    parser.add_argument("--jobs", type=int, default=2, help="stages run at the same time (1: one at a time, output "
                        "on the terminal)")
    args = parser.parse_args()
    args.out_dir = args.out_dir or ("out_rehearse" if args.rehearse else "out")
    os.makedirs(args.out_dir, exist_ok=True)
    timings_path, wall_path = (os.path.join(args.out_dir, name) for name in ("timings.json", "wall_time.json"))
    timings = read_json(timings_path) if os.path.exists(timings_path) else {}
    # the run's wall time, summed over the invocations that ran stages (a resumed run adds up)
    wall = read_json(wall_path)["seconds"] if os.path.exists(wall_path) else 0.0
    stages = stage_graph(args)
    done = {name for name, _, _ in stages if stage_done(os.path.join(args.out_dir, name))}
    run_stages(stages, done, args.out_dir, args.jobs, timings, wall)
    print(f"the report: {os.path.join(args.out_dir, 'REPORT.md')}")
