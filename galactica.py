"""
Galactica's lessons (Taylor et al. 2022), as data the other stages train on as they are (run.py
--extended runs the experiment), and the measurements they need. The token folders each hold a
train.bin of their own and the domain corpus's validation split, so every run's validation loss is on
the same held-out files.

  curated/  a small curated subset of the domain corpus, to be trained on for several epochs (Galactica,
            secs. 3 and 5: a curated corpus of 106B tokens seen for 4.25 epochs, and validation loss
            that kept falling). The rule: functions and methods that carry a docstring, from training files
            (data.py already leaves the tests out), each once (an exact duplicate after collapsing whitespace
            is dropped), in a fixed shuffled order, cut at --curated_tokens so that an epoch is a known
            number of pretraining steps.
  prompts/  the domain corpus with a small share of chat-format documents appended (Galactica, sec. 3:
            prompts mixed into pre-training, which helps "especially for smaller models"): the world's
            requests answered by its demonstrators, drawn as the reward model's prompts are (training
            compositions; the pool is finite, so about a sixth of them are also among SFT's 24000 requests;
            none is a test, dev or unseen prompt), and factual questions about training modules answered
            with a lookup, as SFT's demonstrations are.

    python galactica.py --out_dir out/galactica_data      # after data.py and tools.py --out_dir out/docs
    python pretrain.py --data out/galactica_data/curated --init_from out/pretrain_generic/ckpt.pt ...
    python pretrain.py --data out/galactica_data/prompts --init_from out/pretrain_generic/ckpt.pt ...
    python galactica.py --zero_shot out/pretrain_domain/ckpt.pt out/galactica_prompts/ckpt.pt \
        --out_dir out/galactica_zero_shot                 # domain models asked in the chat format, as they are

  arithmetic.jsonl  working memory (Galactica, sec. 3.1.1: <work> ... </work> around step-by-step
            reasoning), demonstrations in TRL's prompt-completion format: the toolset's multi-digit sums
            and products, each answered one of three ways in turn: with the calculator (as SFT's
            demonstrations), worked out digit by digit inside <|work|> ... <|/work|> and then answered, or
            answered directly; sft.py --demos trains on them (the loss covers the working). --arithmetic
            then asks a fine-tuned model held-out numbers, made to take each road in turn.

    python sft.py --demos out/galactica_data/arithmetic.jsonl --init_from out/pretrain_domain_scratch/ckpt.pt \
        --replay_batch 0 --max_steps 2400 --out_dir out/galactica_arithmetic       # four passes
    python galactica.py --arithmetic out/galactica_arithmetic/ckpt.pt --out_dir out/galactica_arithmetic_eval
"""
import argparse
import ast
import json
import os
import random
import shutil
import textwrap

import numpy as np

from common import print0, write_json
from data import (CALL, CALL_END, EOT, WORK, encode_chat, is_val, load_tokenizer, load_tokens, render_response,
                  stdlib_sources)
from model import load_checkpoint, model_from_checkpoint
from judge import evaluate_policy, sample_responses
from tasks import demonstrate, encode_task, prompt_set
from tools import (ToolRunner, demonstrate_fact, fact_answer_tokens, judge_fact, load_index, make_questions,
                   question_set)

FLAW_RATE = 0.2  # the demonstrators' flaw rate, as SFT's (sft.py --flaw_rate)
FACT_SHARE = 0.25  # of the prompt documents, factual questions: SFT's cpu preset mixes 8000 in 32000
ARITHMETIC = ("product", "sum")  # tools.KINDS' arithmetic questions
ROADS = ("calc", "work", "direct")  # the ways an arithmetic question is answered, dealt in turn


def curate(sources):
    """The curated documents: each documented function or method of the given (name, source) files, its
    source dedented, once. Cheap and checkable, where Galactica's curation was by hand and by source."""
    seen, kept = set(), []
    for _, source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a few stdlib files are deliberately broken
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
                continue
            text = textwrap.dedent(ast.get_source_segment(source, node, padded=True) or "")
            key = " ".join(text.split())  # the same function, indented or wrapped differently, is a duplicate
            if text and key not in seen:
                seen.add(key)
                kept.append(text)
    return kept


def mix(domain, documents, share):
    """The domain tokens with prompt documents appended until they are `share` of the whole (the last
    document cut there): random windows then see prompts that often. Returns (tokens, prompt tokens)."""
    wanted = round(share * len(domain) / (1 - share))
    prompts = np.concatenate([np.asarray(d, dtype=domain.dtype) for d in documents])
    if len(prompts) < wanted:
        raise ValueError(f"{len(prompts)} prompt tokens, fewer than the {wanted} a share of {share} needs")
    return np.concatenate([domain, prompts[:wanted]]), wanted


def column_sum(numbers):
    """Long addition as steps, right to left: each column's digits (0 where a number is too short for it)
    plus the carry, and the column's total, whose last digit is the sum's and the rest the next carry."""
    steps, carry = [], 0
    for i in range(max(len(str(n)) for n in numbers)):
        column = [n // 10 ** i % 10 for n in numbers] + ([carry] if carry else [])
        steps.append("+".join(map(str, column)) + f"={sum(column)}")
        carry = sum(column) // 10
    return ", ".join(steps) + f", so {sum(numbers)}"


def work_out(expression):
    """The working of one of the toolset's arithmetic expressions ('a + b + c' or 'a * b'), digit by
    digit: a sum by columns; a product by a partial product for each digit of b, a one-digit product
    written with its place's zeros, then their long addition."""
    if "*" not in expression:
        return column_sum([int(n) for n in expression.split("+")])
    a, b = (int(n) for n in expression.split("*"))
    places = [b // 10 ** i % 10 * 10 ** i for i in range(len(str(b)))]
    partials = ", ".join(f"{a}*{p}={a * p}" for p in places)
    return f"{partials}; {'+'.join(str(a * p) for p in places)}: {column_sum([a * p for p in places])}"


def demonstrate_arithmetic(index, question, road):
    """An arithmetic question's demonstration by one road: a calculator call and its result, the working
    then the answer, or the answer alone; the answer is the toolset's formulaic claim either way."""
    if road == "work":
        return [("work", work_out(question.subject))] + demonstrate_fact(index, question, False)
    return demonstrate_fact(index, question, road == "calc")


def arithmetic_sets(index, n_train, n_eval, seed):
    """(training, held-out) arithmetic questions: no held-out expression is among the training ones."""
    held_out = make_questions(index, "heldout", n_eval, seed + 1, ARITHMETIC)
    seen = {q.subject for q in held_out}
    return [q for q in make_questions(index, "train", n_train, seed, ARITHMETIC) if q.subject not in seen], held_out


def answer_by_road(model, enc, index, questions, road):
    """Greedy responses (decoded text, tokens written out) made to take one road from their first token:
    'direct' starts with the claim up to the number's backtick, so the number comes first; 'work' with
    <|work|>; 'calc' with <|call|>, and the call's result is then read in by tools.ToolRunner."""
    prompts = [encode_chat(enc, q.prompt)[0] for q in questions]
    max_new = fact_answer_tokens(prompts, model.config.block_size)
    special = enc.encode_single_token
    if road == "direct":
        starts = [enc.encode_ordinary(f"`{q.subject}` is `") for q in questions]
    elif road == "work":
        starts = [[special(WORK)] for _ in questions]
    else:  # the call up to its end token, then the tool's result, forced (a call that never ended gets none)
        calls = sample_responses(model, enc, [p + [special(CALL)] for p in prompts], 1, 0.0, 48,
                                 end_id=special(CALL_END))
        runner = ToolRunner(enc, index)
        starts = [[special(CALL), *c["tokens"]] for c in calls]
        starts = [s + (runner(s) if c["ended"] else []) for s, c in zip(starts, calls)]
    rest = sample_responses(model, enc, [p + s for p, s in zip(prompts, starts)], 1, 0.0,
                            max(1, max_new - max(map(len, starts))))
    return [enc.decode(s) + r["text"] for s, r in zip(starts, rest)]


def write_folder(folder, train, domain_data, meta, **extra):
    """train.bin, the domain corpus's val.bin, and meta.json (written last: it marks the folder complete)."""
    os.makedirs(folder, exist_ok=True)
    train.tofile(os.path.join(folder, "train.bin"))
    shutil.copyfile(os.path.join(domain_data, "val.bin"), os.path.join(folder, "val.bin"))
    write_json(os.path.join(folder, "meta.json"), dict(meta, train=dict(tokens=len(train), **extra)))


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/galactica_data", help="writes curated/ and prompts/ here")
    parser.add_argument("--domain_data", default="out/data/domain", help="the domain token files (data.py)")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--docs_index", default="out/docs/index.json", help="the documentation index (tools.py)")
    parser.add_argument("--curated_tokens", type=int, default=30 * 4096, help="size of the curated subset: one "
                        "epoch of it is this many tokens (30 steps of the cpu preset's 4096)")
    parser.add_argument("--prompt_share", type=float, default=0.03, help="share of the prompts/ folder's training "
                        "tokens in the chat format")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the curated order and the prompt documents")
    parser.add_argument("--zero_shot", nargs="+", default=None, help="instead: these pretraining checkpoints asked "
                        "the test requests in the chat format, no example, no fine-tuning (greedy pass@1)")
    parser.add_argument("--n_eval", type=int, default=150, help="test requests for --zero_shot (SFT's cpu preset's)")
    parser.add_argument("--n_arithmetic", type=int, default=19200, help="arithmetic questions demonstrated in "
                        "arithmetic.jsonl, the roads dealt in turn")
    parser.add_argument("--n_arithmetic_eval", type=int, default=300, help="held-out arithmetic questions")
    parser.add_argument("--arithmetic", default=None, help="instead: this chat model (sft.py) answers the held-out "
                        "arithmetic questions, made to take each road in turn")
    args = parser.parse_args()

    enc = load_tokenizer(args.tokenizer)
    if args.zero_shot:  # what prompts in pretraining can teach a base model: the chat format itself (Galactica, sec. 3)
        tasks, summary = prompt_set("test", args.n_eval, args.seed), {}
        for path in args.zero_shot:
            model = model_from_checkpoint(load_checkpoint(path, ["pretrain"], enc))
            passed = evaluate_policy(model, enc, tasks)[0]["greedy"]["passed"]
            summary[os.path.basename(os.path.dirname(path))] = passed  # by stage: the checkpoint's folder
            print0(f"{path}: zero-shot greedy pass@1 {np.mean(passed):.1%}")
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(os.path.join(args.out_dir, "summary.json"), summary)
        raise SystemExit(0)
    docs = load_index(args.docs_index)
    if args.arithmetic:  # working memory: right by the calculator, by <work>, directly (Galactica, sec. 3.1.1)
        model = model_from_checkpoint(load_checkpoint(args.arithmetic, ["sft"], enc))
        questions = arithmetic_sets(docs, 0, args.n_arithmetic_eval, args.seed)[1]
        summary = dict(kinds=[q.kind for q in questions], exchanges={})
        for road in ROADS:
            responses = answer_by_road(model, enc, docs, questions, road)
            summary[road] = [judge_fact(docs, q, r)["right"] for q, r in zip(questions, responses)]
            summary["exchanges"][road] = [dict(prompt=q.prompt, response=r) for q, r in zip(questions[:8], responses)]
            print0(f"{road}: right {np.mean(summary[road]):.1%} of {len(questions)} held-out questions")
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(os.path.join(args.out_dir, "summary.json"), summary)
        raise SystemExit(0)
    domain = load_tokens(args.domain_data, "train", enc)
    with open(os.path.join(args.domain_data, "meta.json")) as f:
        meta = {k: v for k, v in json.load(f).items() if k in ("tokenizer", "dtype", "val")}
    summary = {}

    # curated: documented functions of training files, deduplicated, in a fixed random order, cut to size
    functions = curate([(name, source) for name, source in stdlib_sources() if not is_val(name)])
    random.Random(args.seed).shuffle(functions)
    eot = enc.encode_single_token(EOT)
    encoded = [ids + [eot] for ids in enc.encode_ordinary_batch(functions)]
    tokens = np.concatenate([np.asarray(ids, dtype=domain.dtype) for ids in encoded])
    if len(tokens) < args.curated_tokens:
        raise SystemExit(f"the curated corpus holds {len(tokens)} tokens, fewer than --curated_tokens")
    used = int(np.searchsorted(np.cumsum([len(ids) for ids in encoded]), args.curated_tokens))  # the last one, cut
    write_folder(os.path.join(args.out_dir, "curated"), tokens[:args.curated_tokens], args.domain_data, meta,
                 functions=used + 1)
    summary["curated"] = dict(tokens=args.curated_tokens, functions=used + 1, documented_functions=len(functions),
                              documented_tokens=len(tokens), domain_tokens=len(domain))
    print0(f"curated: {len(functions):,} documented functions, deduplicated ({len(tokens):,} tokens); kept the "
           f"first {args.curated_tokens:,} tokens ({used + 1:,} functions)")

    # prompts: demonstrations to requests from the reward model's pool and factual questions, 3 to 1, interleaved
    rng = random.Random(args.seed)
    n_docs = round(args.prompt_share * len(domain) / 50)  # a generous count: a chat is 50 tokens or more
    tasks = prompt_set("reward_train", round(n_docs * (1 - FACT_SHARE)), args.seed)
    facts = question_set(docs, "sft_train", round(n_docs * FACT_SHARE), args.seed + 1)  # not SFT's own draw
    programs = [encode_task(enc, t, demonstrate(t, rng, FLAW_RATE)[0])[0] for t in tasks]
    answers = [encode_chat(enc, q.prompt, demonstrate_fact(docs, q, True))[0] for q in facts]
    documents = [d for i, p in enumerate(programs) for d in [p] + (answers[i // 3:i // 3 + 1] if i % 3 == 2 else [])]
    mixed, n_prompt = mix(domain, documents, args.prompt_share)
    write_folder(os.path.join(args.out_dir, "prompts"), mixed, args.domain_data, meta, prompt_tokens=n_prompt)
    summary["prompts"] = dict(share=n_prompt / len(mixed), prompt_tokens=n_prompt, tokens=len(mixed))
    print0(f"prompts: {n_prompt:,} chat tokens appended to {len(domain):,} domain tokens ({n_prompt / len(mixed):.1%})")

    # arithmetic.jsonl: the toolset's arithmetic questions by the three roads in turn, as sft.py --demos reads them
    questions = arithmetic_sets(docs, args.n_arithmetic, args.n_arithmetic_eval, args.seed)[0]
    with open(os.path.join(args.out_dir, "arithmetic.jsonl"), "w") as f:
        for i, q in enumerate(questions):
            completion = render_response(demonstrate_arithmetic(docs, q, ROADS[i % len(ROADS)]))
            f.write(json.dumps(dict(prompt=q.prompt, completion=completion)) + "\n")
    summary["arithmetic"] = dict(demonstrations=len(questions), held_out=args.n_arithmetic_eval)
    print0(f"arithmetic: {len(questions):,} demonstrations, {', '.join(ROADS)} in turn")
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
