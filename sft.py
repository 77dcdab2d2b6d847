"""
Stage 3: supervised fine-tuning (SFT) on demonstrations.

The domain-pretrained model learns to answer requests in the chat format from what simulated
demonstrators wrote (tasks.demonstrate), as InstructGPT fine-tuned GPT-3 on labeler-written
demonstrations (Ouyang et al. 2022, sec. 3.5) and Codex-S fine-tuned Codex on standalone
functions (Chen et al. 2021, sec. 4). The loss covers only the assistant's tokens: the model is
never trained to write the user's request (data.encode_chat marks them).

Then the evaluation the later stages reuse (`sample_responses`, `evaluate_policy`): pass@1 on
held-out prompts, greedy and sampled; pass@k for k = 1..n with the unbiased estimator; reranking
the n samples by mean token log-probability (Codex, sec. 3.3) against a random pick; and the
domain model prompted few-shot, the baseline that fine-tuning must beat (GPT-3 vs fine-tuning).

    python sft.py                                    # cpu preset, from out/pretrain_domain/ckpt.pt
    python sft.py --preset gpu --out_dir out_gpu/sft --init_from out_gpu/pretrain_domain/ckpt.pt ...

Honest simplifications: InstructGPT trained 16 epochs with dropout 0.2 and picked the checkpoint
by reward-model score; we train one pass over fresh demonstrations (the world can write as many
as we like) without dropout, and keep the last checkpoint.
"""
import argparse
import json
import os
import random
import time

import torch
from tqdm import tqdm

from data import END, EOT, chat_batch, encode_chat, load_tokenizer
from model import load_checkpoint, model_from_checkpoint, save_checkpoint
from pretrain import StopFlag, apply_preset, configure_optimizer, cosine_lr, log_metrics, setup_device, synchronize
from tasks import demonstrate, extract_code, few_shot_prompt, gold_eval_many, make_tasks, pass_at_k

PRESETS = {
    "quick": dict(n_train=400, max_steps=20, batch_size=16, lr=1e-3, eval_interval=10, n_eval=24, n_samples=4),
    "cpu": dict(n_train=32000, max_steps=1000, batch_size=32, lr=3e-3, eval_interval=100, n_eval=150, n_samples=10),
    "gpu": dict(n_train=100000, max_steps=3000, batch_size=64, lr=3e-4, eval_interval=500, n_eval=500, n_samples=20),
}


@torch.no_grad()
def sample_responses(model, enc, prompts, n_samples, temperature, max_new_tokens, autocast, generator=None,
                     batch_size=256):
    """n_samples responses to each prompt (token lists), prompt-major, generated in batches with the
    KV cache. Each is a dict: tokens (the response, its end token included when it ended), logprobs
    (per token), text (decoded, end token dropped) and ended (whether it reached the end token)."""
    model.eval()
    end_id, pad_id = enc.encode_single_token(END), enc.encode_single_token(EOT)
    jobs = [p for p in prompts for _ in range(n_samples)]
    out = []
    for start in range(0, len(jobs), batch_size):
        with autocast:
            tokens, logprobs, lengths = model.generate(jobs[start:start + batch_size], max_new_tokens, temperature,
                                                       eos_id=end_id, pad_id=pad_id, generator=generator)
        for row, lps, n in zip(tokens.tolist(), logprobs.tolist(), lengths.tolist()):
            ended = row[n - 1] == end_id
            out.append(dict(tokens=row[:n], logprobs=lps[:n], ended=ended,
                            text=enc.decode(row[:n - 1] if ended else row[:n])))
    return out


def judge(tasks, responses):
    """The gold judge's summary of one response per task: pass rate, mean utility, share breaking
    a rule, and the per-response utilities (for win rates)."""
    evals = gold_eval_many(tasks, [r["text"] for r in responses])
    return dict(pass1=mean(e["passed"] for e in evals), utility=mean(e["utility"] for e in evals),
                violation_rate=mean(any(e["violations"].values()) for e in evals),
                ended=mean(r["ended"] for r in responses), utilities=[e["utility"] for e in evals],
                passed=[e["passed"] for e in evals], examples=[r["text"] for r in responses[:3]])


def evaluate_policy(model, enc, tasks, autocast, n_samples=0, temperature=1.0, max_new_tokens=96, seed=0):
    """The gold judge on a chat policy: its greedy answers and, with n_samples, n samples per
    prompt at the temperature (the distribution RL optimizes): their pass rate, utility and rule
    violations, pass@k for k = 1..n_samples, and pass@1 of the sample with the highest mean token
    log-probability (Codex's reranking) against a random pick. Returns (metrics, samples)."""
    prompts = [encode_chat(enc, t.prompt)[0] for t in tasks]
    m = dict(greedy=judge(tasks, sample_responses(model, enc, prompts, 1, 0.0, max_new_tokens, autocast)))
    samples = []
    if n_samples:
        g = torch.Generator().manual_seed(seed)
        samples = sample_responses(model, enc, prompts, n_samples, temperature, max_new_tokens, autocast, g)
        m["sampled"] = judge([t for t in tasks for _ in range(n_samples)], samples)
        passed = m["sampled"]["passed"]
        groups = [range(i * n_samples, (i + 1) * n_samples) for i in range(len(tasks))]
        counts = [sum(passed[j] for j in group) for group in groups]
        m["pass_at_k"] = {k: mean(pass_at_k(n_samples, c, k) for c in counts) for k in range(1, n_samples + 1)}
        best = [max(group, key=lambda j: mean(samples[j]["logprobs"])) for group in groups]
        m["pass1_reranked_logp"] = mean(passed[j] for j in best)
    return m, samples


@torch.no_grad()
def evaluate_few_shot(model, enc, tasks, shots, autocast, max_new_tokens=80):
    """The base model, prompted with worked examples instead of fine-tuned: greedy pass@1."""
    texts = [few_shot_prompt(shots, t, [s.reference for s in shots]) for t in tasks]
    prompts = [enc.encode_ordinary(text)[-(model.config.block_size - max_new_tokens):] for text in texts]
    model.eval()
    responses = []
    for start in range(0, len(prompts), 64):
        with autocast:
            tokens, _, _ = model.generate(prompts[start:start + 64], max_new_tokens, 0.0)
        responses += [extract_code(enc.decode(row)) for row in tokens.tolist()]
    evals = gold_eval_many(tasks, responses)
    return dict(pass1=mean(e["passed"] for e in evals), examples=responses[:3])


def length_grouped_batches(examples, batch_size, rng):
    """One epoch of batches in random order, each of examples of similar length, so that little
    compute goes to padding: shuffle, sort windows of 50 batches by length, cut, shuffle the cuts."""
    order = rng.sample(range(len(examples)), len(examples))
    batches = []
    for start in range(0, len(order), 50 * batch_size):
        window = sorted(order[start:start + 50 * batch_size], key=lambda i: len(examples[i][0]))
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    rng.shuffle(batches)
    return batches


def mean(values):
    values = list(values)
    return sum(values) / max(1, len(values))


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--init_from", default="out/pretrain_domain/ckpt.pt", help="domain-pretrained checkpoint")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/sft", help="checkpoint, log and summary go here")
    # data
    parser.add_argument("--n_train", type=int, default=None, help="demonstrations (one per training task)")
    parser.add_argument("--flaw_rate", type=float, default=0.2, help="share of demonstrations with a flaw")
    # optimization
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=None, help="demonstrations per step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup_steps", type=int, default=20, help="linear warmup steps")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    # evaluation
    parser.add_argument("--eval_interval", type=int, default=None, help="steps between validation losses")
    parser.add_argument("--save_interval", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--n_eval", type=int, default=None, help="held-out prompts per evaluation")
    parser.add_argument("--n_samples", type=int, default=None, help="samples per prompt for pass@k and reranking")
    parser.add_argument("--n_shots", type=int, default=2, help="worked examples in the base model's prompt")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--seed", type=int, default=1337, help="seeds demonstrations and batches")
    args = apply_preset(parser.parse_args(), PRESETS)

    # -----------------------------------------------------------------------------
    # device, dtype
    device, autocast = setup_device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")

    # -----------------------------------------------------------------------------
    # data: a demonstration for every training task; validation on held-out combinations
    enc = load_tokenizer(args.tokenizer)
    rng = random.Random(args.seed)
    train_tasks = make_tasks("train", args.n_train, args.seed)
    train_demos = [demonstrate(t, rng, args.flaw_rate) for t in train_tasks]
    val_tasks = make_tasks("heldout_comp", 256, args.seed + 1)
    val_examples = [encode_chat(enc, t.prompt, demonstrate(t, rng, args.flaw_rate)[0]) for t in val_tasks]
    train_examples = [encode_chat(enc, t.prompt, code) for t, (code, _) in zip(train_tasks, train_demos)]
    demo_flaw_rate = mean(bool(flaws) for _, flaws in train_demos)
    print(f"data: {len(train_examples)} demonstrations ({demo_flaw_rate:.1%} with a flaw), mean "
          f"{mean(len(t) for t, _ in train_examples):.0f} tokens; {len(val_examples)} held-out for validation")
    pad_id = enc.encode_single_token(EOT)

    # -----------------------------------------------------------------------------
    # model: resume, or start from the domain-pretrained checkpoint
    torch.manual_seed(args.seed)
    batch_rng = random.Random(args.seed)
    # a finished checkpoint resumes at its last step: the loop ends at once and the evaluation runs
    resume = load_checkpoint(ckpt_path, ["sft"], enc, device) if os.path.exists(ckpt_path) else None
    parent = load_checkpoint(args.init_from, ["pretrain"], enc, device)
    model = model_from_checkpoint(resume or parent, device)
    print(f"model shape inherited from {args.init_from}: " +
          " ".join(f"{k}={parent['model_args'][k]}" for k in ("n_layer", "n_head", "n_embd", "block_size")))
    too_long = sum(len(t) > model.config.block_size for t, _ in train_examples)
    assert too_long == 0, f"{too_long} demonstrations exceed block_size {model.config.block_size}"

    # -----------------------------------------------------------------------------
    # optimizer
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), device)
    start_step, batches = 0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start_step = resume["step"]
        batch_rng.setstate(resume["batch_rng"])
        batches = resume["batches"]
        print(f"resuming {ckpt_path} at step {start_step}")

    # -----------------------------------------------------------------------------
    # evaluation helpers
    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        for start in range(0, len(val_examples), args.batch_size):
            x, y = chat_batch(val_examples[start:start + args.batch_size], pad_id, device)
            with autocast:
                losses.append(model(x, y)[1].item())
        model.train()
        return mean(losses)

    def save(step, finished):
        save_checkpoint(ckpt_path, model, "sft", enc, optimizer=optimizer.state_dict(), step=step, finished=finished,
                        config=vars(args), batch_rng=batch_rng.getstate(), batches=batches)

    # -----------------------------------------------------------------------------
    # the loop
    t_start = time.time()
    stop = StopFlag()
    model.train()
    for step in tqdm(range(start_step, args.max_steps + 1), initial=start_step, total=args.max_steps + 1,
                     desc="sft", dynamic_ncols=True):
        last_step = step == args.max_steps
        if stop.stop:
            save(step, finished=False)
            print(f"saved {ckpt_path} at step {step}; run the same command to resume")
            raise SystemExit(130)
        if step % args.eval_interval == 0 or last_step:
            loss = val_loss()
            log_metrics(log_path, step=step, val_loss=loss)
            tqdm.write(f"step {step:5d}/{args.max_steps} | val loss {loss:.4f}")
        if step > start_step and step % args.save_interval == 0 or last_step:
            save(step, finished=last_step)
        if last_step:
            break

        # ---------------- TRAINING SECTION ----------------
        t0 = time.perf_counter()
        if not batches:
            batches = length_grouped_batches(train_examples, args.batch_size, batch_rng)
        x, y = chat_batch([train_examples[i] for i in batches.pop()], pad_id, device)
        with autocast:
            _, loss = model(x, y)  # mean over the assistant's tokens only (targets are -1 elsewhere)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        lr = cosine_lr(step, args.lr, args.warmup_steps, args.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.perf_counter() - t0
        if step % 10 == 0:
            tokens = int((y >= 0).sum())
            log_metrics(log_path, step=step, loss=loss.item(), lr=lr, grad_norm=norm.item(), ms=dt * 1000,
                        assistant_tok_per_s=tokens / dt)
            tqdm.write(f"step {step:5d}/{args.max_steps} | loss {loss.item():.4f} | lr {lr:.1e} | "
                       f"norm {norm.item():6.3f} | {dt * 1000:6.1f} ms | {tokens / dt:8,.0f} assistant tok/s")
    train_seconds = time.time() - t_start

    # -----------------------------------------------------------------------------
    # the final summary: the gold judge on held-out prompts, and the few-shot base model
    t0 = time.time()
    eval_tasks = make_tasks("heldout_comp", args.n_eval, args.seed + 2)
    results = dict(heldout_comp=evaluate_policy(model, enc, eval_tasks, autocast, args.n_samples, seed=args.seed)[0],
                   heldout_phrase=evaluate_policy(model, enc, make_tasks("heldout_phrase", args.n_eval, args.seed + 3),
                                                  autocast)[0],
                   train_split=evaluate_policy(model, enc, make_tasks("train", args.n_eval, args.seed + 4), autocast)[0])
    base = model_from_checkpoint(parent, device)
    shots = make_tasks("train", args.n_shots, args.seed + 5)
    results["few_shot_base"] = evaluate_few_shot(base, enc, eval_tasks, shots, autocast)
    demo_evals = gold_eval_many(train_tasks[:args.n_eval], [code for code, _ in train_demos[:args.n_eval]])
    summary = dict(results, demonstrations=dict(
        flaw_rate_config=args.flaw_rate, flaw_rate=demo_flaw_rate, pass_rate=mean(e["passed"] for e in demo_evals),
        violation_rate=mean(any(e["violations"].values()) for e in demo_evals)),
        train_seconds=train_seconds, eval_seconds=time.time() - t0, n_eval=args.n_eval, n_samples=args.n_samples,
        n_shots=args.n_shots)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    h = results["heldout_comp"]
    print(f"held-out compositions: pass@1 greedy {h['greedy']['pass1']:.1%} | sampled {h['sampled']['pass1']:.1%} | "
          f"pass@{args.n_samples} {h['pass_at_k'][args.n_samples]:.1%} | reranked {h['pass1_reranked_logp']:.1%} | "
          f"few-shot base {results['few_shot_base']['pass1']:.1%} | sampled violations {h['sampled']['violation_rate']:.1%}")
    print("example:\n" + h["greedy"]["examples"][0])
