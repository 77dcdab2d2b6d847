"""
Stage 3: supervised fine-tuning (SFT) on demonstrations.

The domain-pretrained model learns to answer requests in the chat format from what simulated
demonstrators wrote (tasks.demonstrate), as InstructGPT fine-tuned GPT-3 on labeler-written
demonstrations (Ouyang et al. 2022, sec. 3.5) and Codex-S fine-tuned Codex on standalone functions (Chen
et al. 2021, sec. 4). A tenth of the requests also ask for what the rules forbid (delete a file, run a
shell command, ...): the demonstrators decline that part in a comment, then write the function
(Sparrow's rules). The loss covers only the assistant's tokens: the model is never trained to write the
user's request (data.encode_chat marks them). Mixed in: factual questions about the standard library
answered with the toolset (tools.py; LaMDA, Sparrow): a lookup call, its result, then the answer quoting
the evidence. The result is the tool's, not the assistant's: it is masked out of the loss like the
request. With --tools 0 the same questions are answered closed-book (the answer alone), the baseline
that grounding must beat.

Then the gold judge (judge.evaluate_policy): pass@1 on held-out prompts, greedy and sampled; pass@k for
k = 1..n with the unbiased estimator; reranking the n samples by mean token log-probability (Codex, sec.
3.3) against a random pick; and the domain model prompted few-shot (judge.evaluate_few_shot), the
baseline that fine-tuning must beat (GPT-3 vs fine-tuning); adversarial probing (judge.evaluate_probing,
Sparrow): how often a greedy answer to a held-out forbidden request breaks a rule, and how often one to
an ordinary request declines (over-refusal); and on factual questions about held-out modules, accuracy
and attribution (tools.evaluate_facts). The test prompts' samples go to out_dir/samples_test.json:
best-of-n (reward.py) reranks them and every RL run (ppo.py) is compared with them.

    python sft.py                                    # cpu preset, from out/pretrain_domain/ckpt.pt
    python sft.py --tools 0 --out_dir out/sft_closed_book   # the closed-book baseline
    python sft.py --demos examples/demos.jsonl examples/conversations.jsonl --out_dir out/sft_mine   # your own
    python sft.py --preset gpu --out_dir out_gpu/sft --init_from out_gpu/pretrain_domain/ckpt.pt ...

Honest simplifications: InstructGPT trained 16 epochs with dropout 0.2 and picked the checkpoint
by reward-model score; we train one pass over fresh demonstrations (the world can write as many
as we like) without dropout, and keep the last checkpoint.
"""
import argparse
import math
import os
import random
import time
from statistics import fmean

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (HelpFormatter, StopFlag, any_rank, check_finite, cosine_lr, follow_core_share, fraction,
                    log_metrics, nonneg_float, nonneg_int, parse_args, print0, positive_float, positive_int,
                    setup_device, setup_distributed, synchronize, trim_log, write_json)
from data import (ASSISTANT, EOT, SPECIAL_TOKENS, chat_batch, encode_chat, encode_conversation, fit_block, get_batch,
                  load_tokenizer, load_tokens, read_demos, split_held_out)
from model import load_checkpoint, model_from_checkpoint, save_checkpoint
from judge import (N_SHOTS, evaluate_few_shot, evaluate_followups, evaluate_policy, evaluate_probing, followup_line,
                   gold_eval_many, probing_line, sample_responses)
from tasks import demonstrate, encode_task, prompt_set
from tools import demonstrate_fact, evaluate_facts, fact_answer_tokens, facts_line, load_index, question_set

PRESETS = {
    "quick": dict(n_train=400, n_facts=64, max_steps=20, batch_size=16, lr=1e-3, eval_interval=10, n_eval=16,
                  n_samples=4, n_fact_eval=16, replay_batch=2),
    # cpu: 8000 of the 32000 demonstrations factual. Measured from the same domain model, before the forbidden
    # requests joined the demonstrations (facts right / attributable / greedy test pass@1): 4000: 28 / 16 / 53%;
    # 8000: 41 / 33 / 51%; 10000: 42 / 35 / 45%; 12000: 51 / 41 / 33%
    "cpu": dict(n_train=24000, n_facts=8000, max_steps=1000, batch_size=32, lr=3e-3, eval_interval=200, n_eval=150,
                n_samples=16, n_fact_eval=200, replay_batch=8),
    "gpu": dict(n_train=90000, n_facts=10000, max_steps=3000, batch_size=64, lr=3e-4, eval_interval=500, n_eval=500,
                n_samples=64, n_fact_eval=446, replay_batch=16),
}
N_VAL = 256  # held-out demonstrations for the validation loss
LENGTH_WINDOW = 50  # batches per window sorted by length (length_grouped_batches)
# replayed pretraining windows: 128 tokens, half of them with a copy-teaching span of 5-30 tokens
# (data.insert_repeats). Measured (cpu preset, 1000 steps): without them the induction test fell from
# 86% after domain pretraining to 24% after SFT; with 8 a step it stays at 91%
REPLAY_BLOCK, REPLAY_SPANS = 128, (0.5, 5, 30)


def length_grouped_batches(examples, batch_size, rng):
    """One epoch of batches in random order, each of examples of similar length, so that little
    compute goes to padding: shuffle, sort windows of 50 batches by length, cut, shuffle the cuts."""
    order = rng.sample(range(len(examples)), len(examples))
    batches = []
    for start in range(0, len(order), LENGTH_WINDOW * batch_size):
        window = sorted(order[start:start + LENGTH_WINDOW * batch_size], key=lambda i: len(examples[i][0]))
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    rng.shuffle(batches)
    return batches


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--init_from", default="out/pretrain_domain/ckpt.pt", help="domain-pretrained checkpoint")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/sft", help="checkpoint, log and summary go here")
    # data
    parser.add_argument("--demos", nargs="+", default=None, help="your own demonstrations instead of the world's: "
                        "JSON Lines files, one format per file (data.read_demos); every 20th of them all is held out")
    parser.add_argument("--n_train", type=nonneg_int, help="programming demonstrations (one per training task)")
    parser.add_argument("--flaw_rate", type=fraction, default=0.2, help="share of demonstrations with a flaw")
    parser.add_argument("--n_facts", type=nonneg_int, help="factual questions mixed in (the toolset's demonstrations)")
    parser.add_argument("--tools", type=int, choices=(0, 1), default=1, help="answer them with a lookup and a quote "
                        "(1), or closed-book (0, the baseline)")
    parser.add_argument("--docs_index", default="out/docs/index.json", help="the documentation index's cache "
                        "(tools.py --out_dir out/docs writes it; built here if missing)")
    parser.add_argument("--replay_data", default="out/data/domain", help="pretraining token files (data.py) replayed "
                        "beside the demonstrations")
    parser.add_argument("--replay_batch", type=nonneg_int, help="pretraining windows replayed per step, with "
                        "copy-teaching spans, so that fine-tuning keeps the in-context copying that pretraining "
                        "taught (0: none)")
    # optimization
    parser.add_argument("--max_steps", type=positive_int, help="optimizer steps")
    parser.add_argument("--epochs", type=positive_float, default=None, help="stop after this many passes over the "
                        "demonstrations, or at --max_steps if that comes first")
    parser.add_argument("--batch_size", type=positive_int, help="demonstrations per step")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate")
    parser.add_argument("--warmup_steps", type=nonneg_int, default=20, help="linear warmup steps")
    parser.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--beta2", type=fraction, default=0.95, help="AdamW beta2 (beta1 is 0.9)")
    parser.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="clip the gradient norm (0: off)")
    # evaluation and logging
    parser.add_argument("--eval_interval", type=positive_int, help="steps between validation losses")
    parser.add_argument("--log_interval", type=positive_int, default=10, help="steps between log lines")
    parser.add_argument("--save_interval", type=positive_int, default=250, help="steps between checkpoints")
    parser.add_argument("--n_eval", type=positive_int, help="held-out prompts per evaluation")
    parser.add_argument("--n_samples", type=positive_int, help="samples per prompt for pass@k and reranking")
    parser.add_argument("--n_shots", type=positive_int, default=N_SHOTS, help="worked examples in the base model's "
                        "prompt")
    parser.add_argument("--max_new_tokens", type=positive_int, default=96, help="longest answer in the evaluation")
    parser.add_argument("--n_fact_eval", type=positive_int, help="held-out factual questions in the evaluation")
    parser.add_argument("--eval", default="all", choices=("all", "facts"), help="the whole evaluation, or the factual "
                        "questions alone (the closed-book baseline's)")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="autocast: bf16 where "
                        "the device supports it (auto), or as asked (run.py --rehearse: bf16 on a CPU)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds demonstrations and batches")
    args = parse_args(parser, PRESETS)

    # -----------------------------------------------------------------------------
    # device, dtype, and under torchrun the ranks: rank 0 alone prints, logs, evaluates and saves;
    # every rank draws the same batches and trains on its share of each
    rank, world, device_name = setup_distributed(args.device)
    master = rank == 0
    device, autocast = setup_device(device_name, args.dtype)
    if args.batch_size % world:
        raise ValueError(f"--batch_size {args.batch_size} does not divide among {world} ranks")
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")

    # -----------------------------------------------------------------------------
    # data: a demonstration for every training task and factual question; validation on dev compositions;
    # the judged sets: held-out test requests and factual questions about held-out modules
    enc = load_tokenizer(args.tokenizer)
    block_size = load_checkpoint(args.init_from, ["pretrain"], enc)["model_args"]["block_size"]
    if args.demos:  # yours: those that fit the parent's block (the rest skipped, never cut), every 20th held out;
        # no hidden tests and no factual questions, so no judged sets: the held-out loss is their judge
        demos = [encode_conversation(enc, turns) for path in args.demos for turns in read_demos(path)]
        train_examples, val_examples = split_held_out(fit_block(demos, [len(t) for t, _ in demos], block_size,
                                                                " + ".join(args.demos)))
        n_skipped, facts, test_tasks, fact_questions = len(demos) - len(train_examples) - len(val_examples), [], [], []
        print0(f"data: {len(train_examples)} of your demonstrations from {' + '.join(args.demos)}, mean "
               f"{fmean(len(t) for t, _ in train_examples):.0f} tokens; {len(val_examples)} held out for validation; "
               f"{n_skipped} skipped")
    else:
        rng = random.Random(args.seed)
        train_tasks = prompt_set("sft_train", args.n_train, args.seed)
        train_demos = [demonstrate(t, rng, args.flaw_rate) for t in train_tasks]
        val_tasks = prompt_set("sft_val", N_VAL, args.seed)
        val_examples = [encode_task(enc, t, demonstrate(t, rng, args.flaw_rate)[0]) for t in val_tasks]
        train_examples = [encode_task(enc, t, code) for t, (code, _) in zip(train_tasks, train_demos)]
        docs = load_index(args.docs_index)
        facts = question_set(docs, "sft_train", args.n_facts, args.seed) if args.n_facts else []
        train_examples += [encode_chat(enc, q.prompt, demonstrate_fact(docs, q, args.tools)) for q in facts]
        n_skipped = len(train_examples)  # a conversation with a long flawed answer can pass a small vocabulary's block
        train_examples = fit_block(train_examples, [len(t) for t, _ in train_examples], block_size, "the world's data")
        n_skipped -= len(train_examples)
        test_tasks = prompt_set("test", args.n_eval, args.seed) if args.eval == "all" else []  # facts: closed-book's
        fact_questions = question_set(docs, "sft_eval", args.n_fact_eval, args.seed)
        demo_flaw_rate = fmean(bool(flaws) for _, flaws in train_demos) if train_demos else 0.0
        print0(f"data: {len(train_tasks)} programming demonstrations ({demo_flaw_rate:.1%} with a flaw; "
               f"{sum(bool(t.forbidden) for t in train_tasks)} to requests the rules forbid) and "
               f"{len(facts)} factual ones ({'with the toolset' if args.tools else 'closed-book'}), mean "
               f"{fmean(len(t) for t, _ in train_examples):.0f} tokens; {len(val_examples)} held-out for validation")
    if args.epochs:  # the schedule (warmup, cosine) then spans the passes asked for
        args.max_steps = min(args.max_steps, math.ceil(args.epochs * len(train_examples) / args.batch_size))
    pad_id = enc.encode_single_token(EOT)
    if args.replay_batch and not os.path.exists(os.path.join(args.replay_data, "meta.json")):
        raise SystemExit(f"--replay_data {args.replay_data}: no token files there; run `python data.py` (or pass "
                         "your pretraining data's folder), or --replay_batch 0 to fine-tune without replay")
    replay = load_tokens(args.replay_data, "train", enc) if args.replay_batch else None

    # -----------------------------------------------------------------------------
    # model: resume, or start from the domain-pretrained checkpoint
    torch.manual_seed(args.seed)
    batch_rng = random.Random(args.seed)
    # a finished checkpoint resumes at its last step: the loop ends at once and the evaluation runs
    resume = load_checkpoint(ckpt_path, ["sft"], enc, device) if os.path.exists(ckpt_path) else None
    parent = load_checkpoint(args.init_from, ["pretrain"], enc, device)
    model = model_from_checkpoint(resume or parent, device)
    print0(f"model shape inherited from {args.init_from}: " +
           " ".join(f"{k}={parent['model_args'][k]}" for k in ("n_layer", "n_head", "n_embd", "block_size")))

    # -----------------------------------------------------------------------------
    # optimizer
    optimizer = model.configure_optimizers(args.lr, args.weight_decay, (0.9, args.beta2), device.type)
    start_step, batches = 0, []
    replay_rng = torch.Generator().manual_seed(args.seed)  # every rank replays the same windows, as pretraining's
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start_step = resume["step"]
        batch_rng.setstate(resume["batch_rng"])
        batches = resume["batches"]
        replay_rng.set_state(resume["replay_rng"])
        trim_log(log_path, "step", start_step)
        print0(f"resuming {ckpt_path} at step {start_step}")

    # -----------------------------------------------------------------------------
    # evaluation helpers
    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        for start in range(0, len(val_examples), args.batch_size):
            x, y = chat_batch(val_examples[start:start + args.batch_size], pad_id, device)
            with autocast:
                losses.append(model(x, y, trained_only=True)[1].item())
        model.train()
        return fmean(losses)

    def save(step, finished):
        save_checkpoint(ckpt_path, model, "sft", enc, optimizer=optimizer.state_dict(), step=step, finished=finished,
                        config=vars(args), batch_rng=batch_rng.getstate(), batches=batches,
                        replay_rng=replay_rng.get_state())

    # -----------------------------------------------------------------------------
    # the loop
    t_start = time.time()
    stop = StopFlag()
    model.train()
    train_model = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    for step in tqdm(range(start_step, args.max_steps + 1), initial=start_step, total=args.max_steps + 1,
                     desc="sft", dynamic_ncols=True, disable=not master):
        last_step = step == args.max_steps
        if any_rank(stop.stop, world, device):
            if master:
                save(step, finished=False)
            print0(f"saved {ckpt_path} at step {step}; run the same command to resume")
            raise SystemExit(130)
        if master and (step % args.eval_interval == 0 or last_step):
            val = val_loss()
            log_metrics(log_path, step=step, val_loss=val)
            tqdm.write(f"step {step:5d}/{args.max_steps} | val loss {val:.4f}")
        if master and (last_step or (step > start_step and step % args.save_interval == 0)):
            save(step, finished=last_step)
        if last_step:
            break

        # ---------------- TRAINING SECTION ----------------
        follow_core_share()
        t0 = time.perf_counter()
        if not batches:
            batches = length_grouped_batches(train_examples, args.batch_size, batch_rng)
        batch = batches.pop()
        x, y = chat_batch([train_examples[i] for i in batch[rank::world]], pad_id, device)  # this rank's share
        with autocast:
            _, loss = train_model(x, y, trained_only=True)  # mean over the assistant's tokens (-1 elsewhere)
        # a rank's mean, weighted by its share of the batch's assistant tokens: after DDP averages the
        # ranks' gradients, the step is that of the mean over the whole batch (a factor of 1 on one rank)
        n_batch = sum(sum(train_examples[i][1][1:]) for i in batch)
        total = loss * (int((y >= 0).sum()) * world / n_batch)
        if replay is not None:  # replay, as PPO-ptx mixes pretraining back in (Ouyang et al. 2022), with copying
            xr, yr = get_batch(replay, args.replay_batch, min(REPLAY_BLOCK, model.config.block_size), replay_rng,
                               device, (*REPLAY_SPANS, enc.n_vocab - len(SPECIAL_TOKENS)))
            with autocast:
                replay_loss = train_model(xr, yr)[1]
            total = total + replay_loss
        total.backward()
        lr_share = cosine_lr(step, args.warmup_steps, args.max_steps)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        check_finite(norm)  # a diverged loss stops the run here, before the step spreads it into the weights
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_share
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.perf_counter() - t0
        if master and step % args.log_interval == 0:
            tokens = int((y >= 0).sum())
            log_metrics(log_path, step=step, loss=loss.item(), lr=args.lr * lr_share, grad_norm=norm.item(),
                        **(dict(replay_loss=replay_loss.item()) if replay is not None else {}),
                        ms=dt * 1000, assistant_tok_per_s=tokens / dt)
            tqdm.write(f"step {step:5d}/{args.max_steps} | loss {loss.item():.4f} | lr {args.lr * lr_share:.1e} | "
                       f"norm {norm.item():6.3f} | {dt * 1000:6.1f} ms | {tokens / dt:8,.0f} assistant tok/s")
    train_seconds = time.time() - t_start
    if world > 1:
        torch.distributed.destroy_process_group()
    if not master:
        raise SystemExit(0)

    # -----------------------------------------------------------------------------
    # the final summary: the held-out loss and greedy answers to held-out requests (each demonstration cut after
    # its last <|assistant|>); the gold judge where the data has one: pass@1, pass@k, reranking and the base
    # model prompted few-shot on the test requests, accuracy and attribution on the factual questions
    follow_core_share()
    t0 = time.time()
    summary = dict(val_loss=val, n_train=len(train_examples), n_val=len(val_examples), n_skipped=n_skipped,
                   n_facts=len(facts), tools=args.tools, train_seconds=train_seconds)
    assistant_id = enc.encode_single_token(ASSISTANT)
    held_out = [t[:len(t) - t[::-1].index(assistant_id)] for t, _ in val_examples]
    held_out = [p for p in held_out if len(p) + args.max_new_tokens <= model.config.block_size][:3]
    with autocast:
        summary["examples"] = [a["text"] for a in sample_responses(model, enc, held_out, 1, 0.0, args.max_new_tokens)]
        if test_tasks:
            test, samples = evaluate_policy(model, enc, test_tasks, args.n_samples, 1.0, args.max_new_tokens, args.seed)
            unseen = prompt_set("unseen_train", args.n_eval, args.seed)
            summary.update(test=test, n_eval=args.n_eval, n_samples=args.n_samples, n_shots=args.n_shots,
                           test_phrase=evaluate_policy(model, enc, prompt_set("test_phrase", args.n_eval, args.seed),
                                                       max_new_tokens=args.max_new_tokens)[0],
                           unseen_train=evaluate_policy(model, enc, unseen, max_new_tokens=args.max_new_tokens)[0],
                           unseen_overlap=len({t.prompt for t in unseen} & {t.prompt for t in train_tasks}),
                           few_shot_base=evaluate_few_shot(model_from_checkpoint(parent, device), enc, test_tasks,
                                                           prompt_set("few_shot", args.n_shots, args.seed)),
                           probing=evaluate_probing(model, enc, prompt_set("probe", args.n_eval, args.seed),
                                                    test["greedy"], args.max_new_tokens),
                           followups=evaluate_followups(model, enc, prompt_set("followup", args.n_eval, args.seed),
                                                        args.max_new_tokens))
            demo_evals = gold_eval_many(train_tasks[:args.n_eval], [code for code, _ in train_demos[:args.n_eval]])
            summary["demonstrations"] = dict(flaw_rate_config=args.flaw_rate, flaw_rate=demo_flaw_rate,
                                             forbidden_share=fmean(bool(t.forbidden) for t in train_tasks),
                                             pass_rate=fmean(e["passed"] for e in demo_evals),
                                             violation_rate=fmean(any(e["violations"].values()) for e in demo_evals))
            # the SFT model's test samples, judged: best-of-n reranks them, every RL run is compared with them
            write_json(os.path.join(args.out_dir, "samples_test.json"), dict(
                n_samples=args.n_samples, prompts=[encode_task(enc, t)[0] for t in test_tasks],
                samples=[{k: v for k, v in s.items() if k != "logprobs"} for s in samples]))
        if fact_questions:
            fact_tokens = fact_answer_tokens([encode_chat(enc, q.prompt)[0] for q in fact_questions],
                                             model.config.block_size)
            summary["facts"] = evaluate_facts(model, enc, docs, fact_questions, fact_tokens)
    if args.demos:
        summary.update(demos=args.demos, unavailable={
            "gold judge (pass@k, reranking, few-shot base)": "your demonstrations have no hidden tests",
            "factual accuracy": "they are not the toolset's questions"})
    summary["eval_seconds"] = time.time() - t0
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print0(f"held-out demonstrations ({len(val_examples)}): loss {val:.4f}")
    if test_tasks:
        print0(f"test: pass@1 greedy {test['greedy']['pass1']:.1%} | sampled {test['sampled']['pass1']:.1%} | "
               f"pass@{args.n_samples} {test['pass_at_k'][args.n_samples]:.1%} | reranked "
               f"{test['pass1_reranked_logp']:.1%} | few-shot base {summary['few_shot_base']['pass1']:.1%} | "
               f"sampled violations {test['sampled']['violation_rate']:.1%}")
        print0(probing_line(summary["probing"]))
        print0(followup_line(summary["followups"]))
    if fact_questions:
        print0(facts_line(summary["facts"]))
    for what, why in summary.get("unavailable", {}).items():
        print0(f"not available: {what}: {why}")
    print0("example:\n" + "\n---\n".join(summary["examples"]))
