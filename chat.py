"""
Talk to any stage's model: a terminal chat, one-shot answers for scripts, models side by side with the reward
models' and the gold judge's notes, and a local web page (chat.html). A pretrained model continues text (a task
of the world gets the few-shot prompt of tasks.evaluate_few_shot); an SFT or PPO policy answers in the chat
format, calling its tools. Answers stream from model.generate_stream, the engine every stage samples with.

    python chat.py out/sft                                      # terminal chat
    python chat.py out/ppo --prompt 'Define `f(x)`: add 3 to `x`, and return the result.'
    cat requests.txt | python chat.py out/sft                   # a request per line
    python chat.py --models out/pretrain_domain out/sft out/ppo --reward_dir out/reward --best_of 16 \\
        --task test:3 --task test:17 --json out/examples.json  # held-out requests, side by side, as JSON
    python chat.py --models out/sft out/ppo --reward_dir out/reward --serve   # the page, http://127.0.0.1:8000/

Commands: /reset /temperature 0.7 /top_k 50 /top_p 0.9 /max_tokens 96 /seed 1 /task [SET] [INDEX] /quit. A task
(default: a random held-out one) is answered in a new conversation and judged by its hidden tests. Ctrl-C ends
an answer, not the program. When a conversation outgrows the block, its oldest turns are dropped.
"""
import argparse
import codecs
import contextlib
import functools
import json
import os
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import torch

from common import HelpFormatter, setup_device, write_json
from data import (CALL, CALL_END, END, EOT, RESULT, RESULT_END, encode_chat, encode_conversation, load_tokenizer,
                  segments)
from model import CheckpointError, last_token_scores, load_checkpoint, model_from_checkpoint
from tasks import PROMPT_SETS, RULES, best_of_n, extract_code, few_shot_prompt, gold_eval_many, prompt_set
from tools import ToolRunner, load_index

SETTINGS = dict(temperature=(float, 0.0, 2.0, 0.6), top_k=(int, 0, 10**6, 50),  # name: (type, low, high, default)
                top_p=(float, 0.0, 1.0, 1.0), max_tokens=(int, 1, 4096, 96), seed=(int, 0, 2**31 - 1, 0))
N_SHOTS, FEW_SHOT_NEW = 2, 80  # a pretrained model on a task: sft.py's --n_shots, tasks.evaluate_few_shot's tokens
TASK_LIMIT = 500  # tasks of each prompt set that /task and --task can name
HELD_OUT = "test"  # the prompt set /task draws from by default: held-out compositions, what the report measures
MAX_BODY, MAX_REQUEST, SERVE_MAX_TOKENS = 64 * 2**10, 4000, 256  # the server's limits: body bytes, request chars
COLORS = {CALL: "\033[36m" + CALL, CALL_END: CALL_END + "\033[0m", RESULT: "\033[33m" + RESULT,
          RESULT_END: RESULT_END + "\033[0m"}  # tool calls and results, set apart on a terminal


def check_setting(name, value, max_tokens_cap=None):
    """The same checks for flags, terminal commands and the web API; a ValueError says what is wrong."""
    kind, low, high, _ = SETTINGS[name]
    high = min(high, max_tokens_cap) if name == "max_tokens" and max_tokens_cap else high
    try:
        v = kind(value)
    except (TypeError, ValueError):
        v = None
    if v is None or isinstance(value, bool) or (isinstance(value, float) and v != value) or not low <= v <= high:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'} in [{low}, {high}], "
                         f"not {value!r}")
    return v


def task_spec(text):
    """'test:3' -> ('test', 3): a named prompt set of the world (tasks.PROMPT_SETS) and an index into it."""
    split, _, index = text.rpartition(":")
    if split not in PROMPT_SETS or not index.isdigit() or int(index) >= TASK_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r}: want SET:INDEX, SET one of {', '.join(PROMPT_SETS)}, "
                                         f"INDEX < {TASK_LIMIT}")
    return split, int(index)


@functools.lru_cache(maxsize=None)
def task_list(split, seed):
    return prompt_set(split, TASK_LIMIT, seed)  # the first n tasks of a set do not depend on n

# -----------------------------------------------------------------------------
# loading: the models to talk to, and the reward and rule models that annotate their answers


def find_checkpoint(path):
    """A checkpoint file, or a run folder: its ckpt.pt (the reward stage's folder: reward.pt)."""
    found = [os.path.join(path, n) for n in ("ckpt.pt", "reward.pt") if os.path.isfile(os.path.join(path, n))]
    return path if os.path.isfile(path) or path.endswith(".pt") else (found or [os.path.join(path, "ckpt.pt")])[0]


def load_models(paths, enc, device):
    models = []
    for path in paths:
        ckpt = load_checkpoint(find_checkpoint(path), ("pretrain", "sft", "ppo", "reward", "rules"), enc, device)
        if ckpt["stage"] in ("reward", "rules"):
            raise CheckpointError(f"{path} is a {ckpt['stage']} model: it scores answers, it does not write them; "
                                  f"pass --reward_dir {os.path.dirname(find_checkpoint(path)) or '.'} with a chat")
        gpt = model_from_checkpoint(ckpt, device, dropout=0.0).eval()
        with contextlib.redirect_stdout(sys.stderr):  # model.py names its attention path once: not into a pipe
            gpt.generate([[enc.encode_single_token(EOT)]], 2, 0.0)  # and a warm-up, for honest timings
        name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path) or path))
        name += f"#{len(models)}" if name in [m.name for m in models] else ""
        models.append(SimpleNamespace(name=name, path=path, stage=ckpt["stage"], gpt=gpt, lock=threading.Lock()))
        print(f"{name}: {ckpt['stage']} model, {gpt.num_params() / 1e6:.2f}M parameters, block "
              f"{gpt.config.block_size}, from {find_checkpoint(path)}", file=sys.stderr)
    return models


def load_scorers(reward_dir, enc, device):
    """The reward model and, when the folder has one, the rule model (reward.py --pairs trains none)."""
    rm = load_checkpoint(os.path.join(reward_dir, "reward.pt"), ["reward"], enc, device)
    rules_path = os.path.join(reward_dir, "rules.pt")
    rules = load_checkpoint(rules_path, ["rules"], enc, device) if os.path.exists(rules_path) else None
    if rules is None:
        print(f"no rule model in {reward_dir} (no rules.pt): answers get the reward model's score alone",
              file=sys.stderr)
    return SimpleNamespace(reward=model_from_checkpoint(rm, device).eval(), lock=threading.Lock(), dir=reward_dir,
                           rules=rules and model_from_checkpoint(rules, device).eval(),
                           names=rules.get("rules", list(RULES)) if rules else [])


class LazyTools:
    """tools.ToolRunner for generate_stream, made at the first call: building the documentation index takes
    a while the first time, and most answers call no tool."""

    def __init__(self, enc, index_path):
        self.enc, self.path, self.runner, self.call_end_id = enc, index_path, None, enc.encode_single_token(CALL_END)

    def __call__(self, response_tokens):
        if self.runner is None:
            if not os.path.exists(self.path):
                print(f"(a first tool call: building the documentation index into {self.path})", file=sys.stderr)
            self.runner = ToolRunner(self.enc, load_index(self.path))
        return self.runner(response_tokens)

# -----------------------------------------------------------------------------
# the conversation, generation and the notes


def fit_conversation(enc, history, request, block_size, max_new):
    """The conversation's tokens, open after <|assistant|>, and how many of its oldest turns were dropped so
    that it and max_new tokens fit the block. Whole turns go from the front, so it still starts <|endoftext|>
    <|user|>. (None, n) if the request alone does not fit."""
    for k in range(len(history) + 1):
        tokens = encode_conversation(enc, [(q, segments(a)) for q, a in history[k:]] + [(request, None)])[0]
        if len(tokens) + max_new <= block_size:
            return tokens, k
    return None, len(history)


@torch.no_grad()
def annotate(ctx, results, sequences, task):
    """With --reward_dir, the reward model's score and the rule model's probabilities, read at the last token
    of each sequence as they were trained; for a task of the world, the gold judge's verdict."""
    if ctx.scorers:
        sc, seqs = ctx.scorers, [s[-ctx.scorers.reward.config.block_size:] for s in sequences]
        with sc.lock:
            rewards = last_token_scores(sc.reward, seqs, ctx.eot)[:, 0].tolist()
            probs = torch.sigmoid(last_token_scores(sc.rules, seqs, ctx.eot)).tolist() if sc.rules else [[]] * len(seqs)
        for r, score, p in zip(results, rewards, probs):
            r.update(reward=round(score, 4), rules={name: round(q, 4) for name, q in zip(sc.names, p)})
    if task is not None:  # the hidden tests in the sandbox, the rule checker, the noiseless utility
        for r, g in zip(results, gold_eval_many([task] * len(results), [r.get("code", r["text"]) for r in results])):
            r["gold"] = dict(result=g["result"], utility=round(g["utility"], 4), violations=g["violations"])
    return results


def answer(ctx, m, request, history, task, s, generator, emit):
    """One model's answer: its text streamed through emit as it grows, then its notes."""
    block, pretrained = m.gpt.config.block_size, m.stage == "pretrain"
    max_new = min(s["max_tokens"], FEW_SHOT_NEW) if pretrained and task else s["max_tokens"]
    if pretrained:  # plain text, or the few-shot prompt of tasks.evaluate_few_shot
        text = few_shot_prompt(ctx.shots, task, [t.reference for t in ctx.shots]) if task else request
        prompt, dropped = (ctx.enc.encode_ordinary(text)[-(block - max_new):] if max_new < block else None), 0
    else:
        prompt, dropped = fit_conversation(ctx.enc, history, request, block, max_new)
    if not prompt:
        return emit(dict(model=m.name, error=f"the request and {max_new} new tokens do not fit the {block}-token "
                                             f"block: shorten it or lower max_tokens"))
    if dropped:
        emit(dict(model=m.name, note=f"dropped the {dropped} oldest turn(s) to fit the {block}-token block"))
    eos, tokens = ctx.eot if pretrained else ctx.end, []
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a character split over two tokens waits for both
    with m.lock:  # one answer at a time per model: the server's other requests wait here
        t0 = ttft = time.perf_counter()
        for _, tok, _, _ in m.gpt.generate_stream([prompt], max_new, s["temperature"], s["top_k"] or None, s["top_p"],
                                                  eos, ctx.eot, generator, None if pretrained else ctx.tools):
            tokens.append(tok.item())
            ttft = time.perf_counter() if len(tokens) == 1 else ttft
            if tokens[-1] != eos and (piece := utf8.decode(ctx.enc.decode_single_token_bytes(tokens[-1]))):
                emit(dict(model=m.name, text=piece))
        if piece := utf8.decode(b"", final=True):  # bytes of a character the answer never finished
            emit(dict(model=m.name, text=piece))
    ended, t1 = tokens[-1] == eos, time.perf_counter()
    r = dict(model=m.name, stage=m.stage, text=ctx.enc.decode(tokens[:-1] if ended else tokens), tokens=len(tokens),
             ended=ended, context_tokens=len(prompt), ttft_s=ttft - t0,
             tok_per_s=(len(tokens) - 1) / max(t1 - ttft, 1e-9))  # decoding speed, after the first token
    if pretrained:  # the reward models judge its text as if it were a chat answer
        r["code"] = extract_code(r["text"]) if task else r["text"]
    seq = encode_chat(ctx.enc, task.prompt if task else request, r["code"])[0] if pretrained else prompt + tokens
    emit(dict(model=m.name, done=annotate(ctx, [r], [seq], task)[0]))
    return r


def best_of(ctx, m, request, history, task, s, generator, emit):
    """N samples from a chat model (at temperature 1 when greedy, which would give N copies) and the one that
    tasks.best_of_n picks: drop those the rule model flags, then the highest reward (Sparrow, LaMDA)."""
    n, (prompt, _) = ctx.best_of, fit_conversation(ctx.enc, history, request, m.gpt.config.block_size, s["max_tokens"])
    if prompt is None:
        return None
    with m.lock:
        g = m.gpt.generate([prompt] * n, s["max_tokens"], s["temperature"] or 1.0, s["top_k"] or None, s["top_p"],
                           ctx.end, ctx.eot, generator, ctx.tools)
    samples = [row[:k] for row, k in zip(g.tokens.tolist(), g.lengths.tolist())]
    results = annotate(ctx, [dict(model=f"best-of-{n} ({m.name})", stage="best_of", tokens=len(t),
                                  ended=t[-1] == ctx.end, text=ctx.enc.decode(t[:-1] if t[-1] == ctx.end else t))
                             for t in samples],
                       [prompt + t for t in samples], None)
    rule_probs = [[*r["rules"].values(), 0.0] for r in results]  # 0.0: without a rule model, nothing is flagged
    pick = best_of_n([[r["reward"] for r in results]], [rule_probs], n)[0]
    r = annotate(ctx, [dict(results[pick], picked=pick)], [prompt + samples[pick]], task)[0]
    emit(dict(model=r["model"], done=r))
    return r


def answer_all(ctx, request, histories, s, emit, task=None, models=None, generators=None):
    """Every model's answer to one request, then the best-of-n column. Without generators (the server), each
    answer samples from the seed alone: the same settings give the same answers."""
    gens = generators or {name: torch.Generator(ctx.device).manual_seed(s["seed"] + i)
                          for i, name in enumerate([m.name for m in ctx.models] + ["best_of"])}
    results = [answer(ctx, m, request, histories.get(m.name, []), task, s, gens[m.name], emit)
               for m in models or ctx.models]
    if ctx.best_of and (chat := [m for m in ctx.models if m.stage != "pretrain"]):
        results.append(best_of(ctx, chat[0], request, histories.get(chat[0].name, []), task, s, gens["best_of"], emit))
    return [r for r in results if r]

# -----------------------------------------------------------------------------
# the terminal: typed, piped (a request per line) or from --prompt and --task


def printer(ctx, stats):
    """emit() for the terminal: a header per model when there are several, the answer as it streams, its notes."""
    seen, multi, tty = set(), len(ctx.models) > 1 or ctx.best_of, sys.stdout.isatty()

    def emit(e):
        if multi and e["model"] not in seen:
            print(f"--- {e['model']}")
        seen.add(e["model"])
        if "note" in e or "error" in e:
            return print(f"({e.get('note') or e['error']})", file=sys.stderr)
        text = e["text"] if "text" in e else e["done"]["text"] if e["done"]["stage"] == "best_of" else ""
        text = re.sub("|".join(map(re.escape, COLORS)), lambda x: COLORS[x[0]], text) if tty else text
        print(text, end="", flush=True)
        if d := e.get("done"):
            out = [f"reward {d['reward']:+.3f}"] if "reward" in d else []
            out += ["rules " + " ".join(f"{k} {v:.2f}" for k, v in d["rules"].items())] if d.get("rules") else []
            out += [f"gold {d['gold']['result']}, utility {d['gold']['utility']:.3f}"] if "gold" in d else []
            out += [f"picked sample {d['picked']}"] if "picked" in d else []
            out += [f"context {d['context_tokens']} tokens | {d['tokens']} new | first token {d['ttft_s'] * 1e3:.0f} "
                    f"ms | {d['tok_per_s']:.1f} tok/s"] if stats and "ttft_s" in d else []
            print("\n  [" + " | ".join(out) + "]" if out else "", flush=True)
    return emit


def typed_lines():
    while True:
        try:
            yield input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr)


def run_terminal(ctx, s, lines, stats, record=None):
    """A request or a command per line; with record, every answer and its notes go into that list too."""
    histories, gens = {}, None
    echo = (record is not None or not sys.stdin.isatty()) and (len(ctx.models) > 1 or ctx.best_of)
    for line in lines:
        line, task = line.strip(), None
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            cmd, arg = (line[1:].split(maxsplit=1) + [""])[:2]
            try:
                if cmd in SETTINGS:
                    s[cmd] = check_setting(cmd, arg)
                elif cmd == "task":
                    split, _, index = arg.partition(" ")
                    split, index = task_spec(f"{split or HELD_OUT}:{index or random.randrange(TASK_LIMIT)}")
                    task, line = task_list(split, ctx.world_seed)[index], f"{split}:{index}"
                elif cmd != "reset":
                    raise ValueError(f"commands: /reset /quit /task [SET] [INDEX] /{' /'.join(SETTINGS)} VALUE")
                histories = {} if cmd in ("reset", "task") else histories
                gens = None if cmd == "seed" else gens
                print(f"({cmd} = {s[cmd]})" if cmd in SETTINGS else "(new conversation)", file=sys.stderr)
            except (ValueError, argparse.ArgumentTypeError) as e:
                print(f"({e})", file=sys.stderr)
            if task is None:
                continue
        if not line:
            continue
        if gens is None:  # one stream of samples per model, from the seed
            gens = {name: torch.Generator(ctx.device).manual_seed(s["seed"] + i)
                    for i, name in enumerate([m.name for m in ctx.models] + ["best_of"])}
        request = task.prompt if task else line
        if echo or task:
            print(f"=== {line}: {request}" if task else f"=== {request}", file=sys.stdout if echo else sys.stderr)
        try:
            results = answer_all(ctx, request, histories, s, printer(ctx, stats), task, generators=gens)
        except KeyboardInterrupt:
            print("\n(stopped; this turn is not kept)", file=sys.stderr)
            continue
        for r in [] if task else [r for r in results if r["stage"] in ("sft", "ppo")]:
            histories.setdefault(r["model"], []).append((request, r["text"]))
        if record is not None:  # timings only with --stats, so that the file is the same on every run
            record.append(dict(request=request, task=line if task else None, answers=[
                {k: v for k, v in r.items() if stats or k not in ("ttft_s", "tok_per_s")} for r in results]))

# -----------------------------------------------------------------------------
# the web page: http.server, one page (chat.html), a JSON API, answers streamed as lines of JSON


def parse_chat(ctx, body):
    """(request, histories, settings, task, models) from a POST /api/chat body; a ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    if unknown := set(body) - {"request", "history", "task", "models", *SETTINGS}:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    s = {k: check_setting(k, body.get(k, ctx.settings[k]), SERVE_MAX_TOKENS) for k in SETTINGS}
    names, known = body.get("models", [m.name for m in ctx.models]), [m.name for m in ctx.models]
    if not isinstance(names, list) or not names or (bad := [n for n in names if n not in known]):
        raise ValueError(f"unknown model(s) {bad if isinstance(names, list) else names}; here: {', '.join(known)}")
    if (t := body.get("task")) is not None:
        if not isinstance(t, dict) or set(t) != {"split", "index"} or type(t["index"]) is not int:
            raise ValueError('task must be {"split": SET, "index": N}')
        split, index = task_spec(f"{t['split']}:{t['index']}")
    task = task_list(split, ctx.world_seed)[index] if t is not None else None
    request, history = (task.prompt, {}) if task else (body.get("request"), body.get("history", {}))
    if not isinstance(request, str) or not 0 < len(request.strip()) <= MAX_REQUEST:
        raise ValueError(f"request must be a string of 1 to {MAX_REQUEST} characters")
    if not isinstance(history, dict) or not all(isinstance(h, list) and all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(x, str) for x in p) for p in h) for h in history.values()):
        raise ValueError("history must map model names to lists of [request, answer] pairs")
    return request.strip(), history, s, task, [m for m in ctx.models if m.name in names]


def serve(ctx, host, port):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html"), "rb") as f:
        page = f.read()
    config = dict(models=[dict(name=m.name, stage=m.stage) for m in ctx.models], best_of=ctx.best_of, split=HELD_OUT,
                  reward=ctx.scorers and ctx.scorers.dir, splits=list(PROMPT_SETS), settings=ctx.settings)

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code, data, kind="application/json"):
            data = data if isinstance(data, bytes) else json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url, q = urlparse(self.path), parse_qs(urlparse(self.path).query)
            if url.path in ("/", "/api/config"):
                return self.reply(200, page, "text/html; charset=utf-8") if url.path == "/" else self.reply(200, config)
            if url.path != "/api/task":
                return self.reply(404, dict(error=f"no such page: {url.path}"))
            try:
                split, i = task_spec(f"{q.get('split', [HELD_OUT])[0]}:"
                                     f"{q.get('index', [random.randrange(TASK_LIMIT)])[0]}")
            except argparse.ArgumentTypeError as e:
                return self.reply(400, dict(error=str(e)))
            self.reply(200, dict(split=split, index=i, prompt=task_list(split, ctx.world_seed)[i].prompt))

        def do_POST(self):
            if urlparse(self.path).path != "/api/chat":
                return self.reply(404, dict(error=f"no such endpoint: {self.path}"))
            length = int(n) if (n := self.headers.get("Content-Length", "0")).isdigit() else -1
            if length < 0:
                return self.reply(400, dict(error="Content-Length must be a number of bytes"))
            if length > MAX_BODY:
                for _ in range(min(length, 64 * MAX_BODY) // MAX_BODY):  # read it, so that the client hears the 413
                    self.rfile.read(MAX_BODY)
                return self.reply(413, dict(error=f"a body of {length} bytes: the limit is {MAX_BODY}"))
            try:
                request, history, s, task, models = parse_chat(ctx, json.loads(self.rfile.read(length) or b"null"))
            except (ValueError, argparse.ArgumentTypeError) as e:  # bad JSON is a ValueError too
                return self.reply(400, dict(error=str(e).splitlines()[0]))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()

            def emit(event):
                self.wfile.write(json.dumps(event).encode() + b"\n")
                self.wfile.flush()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the page went away: stop there
                answer_all(ctx, request, history, s, emit, task, models)

    server = ThreadingHTTPServer((host, port), Handler)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who reaches it can use it, with no password", file=sys.stderr)
    print(f"serving {', '.join(m.name for m in ctx.models)} on http://{host}:{server.server_address[1]}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # models
    parser.add_argument("model", nargs="*", help="checkpoints or run folders to talk to; out/sft if none")
    parser.add_argument("--models", nargs="+", default=[], help="more of them; each answers every request")
    parser.add_argument("--reward_dir", help="the reward stage's folder (reward.pt, rules.pt): scores every answer")
    parser.add_argument("--best_of", type=int, default=0, help="add the best of N samples of the first chat model")
    parser.add_argument("--tokenizer", help="default: tokenizer.json in the first model's folder or the one above")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--no_tools", action="store_true", help="do not run the tools a chat model calls")
    # sampling: the same settings as the terminal's commands and the page's fields
    for name, (kind, low, high, default) in SETTINGS.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"in [{low}, {high}]" + dict(
            temperature="; 0 is greedy", top_k="; 0 is off", top_p="; 1 is off").get(name, ""))
    # requests
    parser.add_argument("--prompt", action="append", default=[], help="answer this and exit (repeatable)")
    parser.add_argument("--task", action="append", type=task_spec, default=[], help="SET:INDEX, a request of the "
                        "world judged by its hidden tests, e.g. test:3 (held-out compositions); repeatable")
    parser.add_argument("--world_seed", type=int, default=1337, help="the pipeline's --seed: test:3 is its prompt 3")
    parser.add_argument("--json", help="write every answer and its notes to this file")
    parser.add_argument("--stats", action="store_true", help="show context size, time to first token and tokens/s")
    # the web page
    parser.add_argument("--serve", action="store_true", help="serve the chat page instead of the terminal")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on; anything but this machine warns")
    parser.add_argument("--port", type=int, default=8000, help="port of the page (0: any free one)")
    args = parser.parse_args()
    for name in SETTINGS:
        try:
            check_setting(name, getattr(args, name))
        except ValueError as e:
            parser.error(f"argument --{name}: {e}")
    if args.best_of and not args.reward_dir:
        parser.error("--best_of needs --reward_dir: the reward and rule models pick the best sample")

    device, _ = setup_device(args.device)  # fp32 even on a GPU: one sequence at a time is bound by latency
    paths = args.model + args.models or [os.path.join("out", "sft")]
    where = os.path.dirname(os.path.abspath(find_checkpoint(paths[0])))
    tokenizer = args.tokenizer or next((p for p in (os.path.join(d, "tokenizer.json") for d in (
        where, os.path.dirname(where))) if os.path.exists(p)), os.path.join("out", "tokenizer.json"))
    try:
        for p in [find_checkpoint(p) for p in paths] + [tokenizer]:
            if not os.path.exists(p):
                raise CheckpointError(f"not found: {p} (run the stage that writes it first, or pass another path)")
        enc = load_tokenizer(tokenizer)
        ctx = SimpleNamespace(enc=enc, device=device, eot=enc.encode_single_token(EOT),
                              end=enc.encode_single_token(END), models=load_models(paths, enc, device),
                              best_of=args.best_of, world_seed=args.world_seed,
                              scorers=load_scorers(args.reward_dir, enc, device) if args.reward_dir else None,
                              shots=prompt_set("few_shot", N_SHOTS, args.world_seed),
                              settings={k: getattr(args, k) for k in SETTINGS},
                              # the toolset (tools.py), its documentation index cached beside the tokenizer
                              tools=None if args.no_tools else LazyTools(enc, os.path.join(os.path.dirname(
                                  os.path.abspath(tokenizer)), os.path.join("docs", "index.json"))))
    except CheckpointError as e:
        sys.exit(f"chat.py: {e}")
    if args.serve:
        serve(ctx, args.host, args.port)
    elif args.prompt or args.task:  # one-shot: each request in a new conversation
        record = []
        run_terminal(ctx, dict(ctx.settings), [x for p in args.prompt for x in (p, "/reset")] +
                     ["/task %s %d" % t for t in args.task], args.stats, record)
        if args.json:
            write_json(args.json, dict(models={m.name: m.path for m in ctx.models}, reward_dir=args.reward_dir,
                                       best_of=args.best_of, settings=ctx.settings, world_seed=args.world_seed,
                                       requests=record))
    else:
        run_terminal(ctx, dict(ctx.settings), typed_lines(), args.stats)
