"""
Talk to any stage's model: a terminal chat, one-shot answers for scripts, models side by side with the reward
models' and the gold judge's notes, and a local web page (chat.html). A pretrained model continues text (a task
of the world gets the few-shot prompt of judge.evaluate_few_shot); an SFT or PPO policy answers in the chat
format, calling its tools. Answers stream from model.generate_stream, the engine every stage samples with.

    python chat.py out/sft                                      # terminal chat
    python chat.py out/ppo --prompt 'Define `f(x)`: add 3 to `x`, and return the result.'
    cat requests.txt | python chat.py out/sft                   # a request per line
    python chat.py --models out/pretrain_domain out/sft out/ppo --reward_dir out/reward --best_of 16 \\
        --task test:3 --task test:17 --json out/examples.json  # held-out requests, side by side, as JSON
    python chat.py --models out/sft out/ppo --reward_dir out/reward --serve   # the page, http://127.0.0.1:8000/

Commands: /reset /temperature 0.7 /top_k 50 /top_p 0.9 /max_tokens 96 /seed 1 /task [SET[:INDEX]] /quit. A task
(/task test:3, or a random held-out one) starts a new conversation and is judged by its hidden tests. Ctrl-C ends
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
import socket
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import torch

from common import HelpFormatter, setup_device, write_json
from data import END, EOT, SEGMENT_TOKENS, encode_chat, encode_response, load_tokenizer
from model import CheckpointError, last_token_scores, load_checkpoint, model_from_checkpoint
from judge import FEW_SHOT_TOKENS, N_SHOTS, best_of_n, extract_code, few_shot_prompt, gold_eval_many
from tasks import PROMPT_SETS, RULES, declines, prompt_set
from tools import ToolRunner, load_index

SETTINGS = dict(temperature=(float, 0.0, 2.0, 0.6), top_k=(int, 0, 10**6, 50),  # name: (type, low, high, default)
                top_p=(float, 0.0, 1.0, 1.0), max_tokens=(int, 1, 4096, 96), seed=(int, 0, 2**31 - 1, 0))
TASK_LIMIT = 500  # tasks of each prompt set that /task and --task can name
HELD_OUT = "test"  # the prompt set /task draws from by default: held-out compositions, what the report measures
MAX_BODY, MAX_REQUEST, MAX_BEST_OF = 64 * 2**10, 4000, 64  # the limits: body bytes, request chars, best-of samples
SOCKET_TIMEOUT = 10  # seconds a client may stall mid-request or stop reading; then its thread is free again
SEGMENT_COLORS = {"call": "\033[36m", "result": "\033[33m", "work": "\033[2m"}  # on a terminal; the working dim
COLORS = {token: colored for kind, (start, end) in SEGMENT_TOKENS.items()
          for token, colored in ((start, SEGMENT_COLORS[kind] + start), (end, end + "\033[0m"))}


def check_setting(name, value):
    """The same checks for flags, terminal commands and the web API; a ValueError says what is wrong."""
    kind, low, high, _ = SETTINGS[name]
    try:
        v = kind(value)
    except (TypeError, ValueError, OverflowError):  # int(1e400): JSON's huge numbers are infinite floats
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


class LazyTools(ToolRunner):
    """tools.ToolRunner whose documentation index is loaded at the first call: building it takes a while the
    first time, and most answers call no tool."""

    def __init__(self, enc, index_path):
        super().__init__(enc, None)
        self.path = index_path

    def __call__(self, response_tokens):
        if self.index is None:
            if not os.path.exists(self.path):
                print(f"(a first tool call: building the documentation index into {self.path})", file=sys.stderr)
            self.index = load_index(self.path)
        return super().__call__(response_tokens)

# -----------------------------------------------------------------------------
# the conversation, generation and the notes


def fit_conversation(enc, history, request, block_size, max_new):
    """The conversation's tokens, open after <|assistant|>, and how many of its oldest turns were dropped so
    that it and max_new tokens fit the block. Whole turns go from the front, so it still starts <|endoftext|>
    <|user|>. (None, n) if the request alone does not fit.

    A past answer is the engine's own tokens (the terminal keeps them) or text (the page's history, any
    client's): text is read as ordinary tokens, so that neither a client nor a model spelling <|result|> with
    ordinary tokens can plant a tool result; only the engine writes the tools' special tokens. Turns are
    encoded newest first, each once, until the block is full: the work is bounded by the block, not the history."""
    tokens = encode_chat(enc, request)[0]  # <|endoftext|> <|user|> request <|assistant|>
    room, kept = block_size - max_new - len(tokens), []
    for q, a in reversed(history):
        turn = encode_chat(enc, q)[0][1:] + (a + [enc.encode_single_token(END)] if isinstance(a, list)
                                              else encode_response(enc, a)[0])
        if len(turn) > room:
            break
        room -= len(turn)
        kept.append(turn)
    if room < 0:
        return None, len(history)
    return tokens[:1] + [t for turn in reversed(kept) for t in turn] + tokens[1:], len(history) - len(kept)


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
            r["gold"] = dict(result=g["result"], utility=round(g["utility"], 4), violations=g["violations"],
                             declined=declines(r.get("code", r["text"])))
    return results


def answer(ctx, m, request, history, task, s, generator, emit):
    """One model's answer: its text streamed through emit as it grows, then its notes; a chat model's history
    gains the turn, as the engine wrote it."""
    block, pretrained = m.gpt.config.block_size, m.stage == "pretrain"
    if pretrained and task is not None and task.history:
        return emit(dict(model=m.name, note="a base model answers a single request (few-shot), not a conversation"))
    max_new = min(s["max_tokens"], FEW_SHOT_TOKENS) if pretrained and task else s["max_tokens"]
    if pretrained:  # plain text, or the few-shot prompt of judge.evaluate_few_shot
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
    if not pretrained:  # turns that no longer fit the block are gone for good: the history stays bounded
        history[:] = history[dropped:] + [(request, tokens[:-1] if ended else tokens)]
    return r


def best_of(ctx, m, request, history, task, s, generator, emit):
    """N samples from a chat model (at temperature 1 when greedy, which would give N copies) and the one that
    judge.best_of_n picks: drop those the rule model flags, then the highest reward (Sparrow, LaMDA)."""
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


def sample_streams(ctx, seed):
    """One stream of samples per model (and one for best-of-n), from the seed."""
    return {name: torch.Generator(ctx.device).manual_seed(seed + i)
            for i, name in enumerate([m.name for m in ctx.models] + ["best_of"])}


def answer_all(ctx, request, histories, s, emit, task=None, models=None, generators=None):
    """Every model's answer to one request (each chat model's history, a list in histories, gains the turn), then
    the best-of-n column when its model was asked. Without generators (the server), each answer samples from the
    seed alone: the same settings give the same answers."""
    gens = generators or sample_streams(ctx, s["seed"])
    first = next((m for m in ctx.models if m.stage != "pretrain"), None)  # the model best-of samples
    past = list(histories.get(first.name, [])) if first else []  # its history before this turn
    results = [answer(ctx, m, request, histories.setdefault(m.name, []), task, s, gens[m.name], emit)
               for m in models or ctx.models]
    if ctx.best_of and any(m is first for m in models or ctx.models):  # no column for a model not asked
        results.append(best_of(ctx, first, request, past, task, s, gens["best_of"], emit))
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
    """Lines typed or piped in. On a terminal, the standard library's readline gives line editing and history
    (arrow keys), and reads keys one by one: the kernel's own line editing would cut a line at 4,095 bytes."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # not on every platform; input() works without it
            import readline  # noqa: F401  (importing it is what turns it on for input())
    while True:
        try:
            yield input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr)


def run_terminal(ctx, s, lines, stats, label, record=None):
    """A request or a command per line. With label, each answer comes under a line naming its request (piped, or
    several at once: answers that would run together); with record, every answer and its notes go into it too."""
    histories, gens = {}, None
    for line in lines:
        line, task = line.strip(), None
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            cmd, arg = (line[1:].split(maxsplit=1) + [""])[:2]
            try:
                if cmd in SETTINGS:
                    s[cmd] = check_setting(cmd, arg)
                elif cmd == "task":  # /task, /task test, /task test:3 (and /task test 3)
                    split, _, index = arg.replace(":", " ").partition(" ")
                    split, index = task_spec(f"{split or HELD_OUT}:{index.strip() or random.randrange(TASK_LIMIT)}")
                    task, line = task_list(split, ctx.world_seed)[index], f"{split}:{index}"
                elif cmd != "reset":
                    raise ValueError(f"commands: /reset /quit /task [SET[:INDEX]] /{' /'.join(SETTINGS)} VALUE")
                histories = {} if cmd in ("reset", "task") else histories
                if task is not None:  # a conversation of the world goes on from its earlier turns, in every model
                    histories = {m.name: list(task.history) for m in ctx.models}
                gens = None if cmd == "seed" else gens
                print(f"({cmd} = {s[cmd]})" if cmd in SETTINGS else "(new conversation)", file=sys.stderr)
            except (ValueError, argparse.ArgumentTypeError) as e:
                print(f"({e})", file=sys.stderr)
            if task is None:
                continue
        if not line:
            continue
        gens = gens or sample_streams(ctx, s["seed"])
        request = task.prompt if task else line
        if label or task:
            for q, a in task.history if task else ():
                print(f"=== {line}, earlier: {q}\n{a}", file=sys.stdout if label else sys.stderr)
            print(f"=== {line}: {request}" if task else f"=== {request}", file=sys.stdout if label else sys.stderr)
        turn = {name: list(h) for name, h in histories.items()}  # the histories after this turn, if it completes
        try:
            results = answer_all(ctx, request, turn, s, printer(ctx, stats), task, generators=gens)
        except KeyboardInterrupt:
            print("\n(stopped; this turn is not kept)", file=sys.stderr)
            continue
        histories = turn
        if record is not None:  # timings only with --stats, so that the file is the same on every run
            record.append(dict(request=request, task=line if task else None,
                               history=[list(turn) for turn in task.history] if task else [],
                               follow_up=task.follow_up[0] if task and task.follow_up else None, answers=[
                {k: v for k, v in r.items() if stats or k not in ("ttft_s", "tok_per_s")} for r in results]))

# -----------------------------------------------------------------------------
# the web page: http.server, one page (chat.html), a JSON API, answers streamed as lines of JSON


def parse_chat(ctx, body):
    """(request, histories, settings, task, models) from a POST /api/chat body; a ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    if unknown := set(body) - {"request", "history", "task", "models", *SETTINGS}:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    s = {k: check_setting(k, body.get(k, ctx.settings[k])) for k in SETTINGS}
    known = [m.name for m in ctx.models]
    if not isinstance(names := body.get("models", known), list) or not names or any(n not in known for n in names):
        raise ValueError(f"models must be a non-empty list of names from: {', '.join(known)}")
    if (t := body.get("task")) is not None:
        if not isinstance(t, dict) or set(t) != {"split", "index"} or type(t["index"]) is not int:
            raise ValueError('task must be {"split": SET, "index": N}')
        split, index = task_spec(f"{t['split']}:{t['index']}")
    task = task_list(split, ctx.world_seed)[index] if t is not None else None
    request, history = ((task.prompt, {m.name: [list(turn) for turn in task.history] for m in ctx.models}) if task
                        else (body.get("request"), body.get("history", {})))
    if not isinstance(request, str) or not 0 < len(request.strip()) <= MAX_REQUEST:
        raise ValueError(f"request must be a string of 1 to {MAX_REQUEST} characters")
    if not isinstance(history, dict) or not all(isinstance(h, list) and all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(x, str) for x in p) for p in h) for h in history.values()):
        raise ValueError("history must map model names to lists of [request, answer] pairs")
    models = [m for m in ctx.models if m.name in names]
    for m in models:  # max_tokens bounded by what fits: the request (a pretrained model's is cut) and the answer
        block = m.gpt.config.block_size
        room = block - (1 if m.stage == "pretrain" else len(encode_chat(ctx.enc, request.strip())[0]))
        if s["max_tokens"] > room:
            raise ValueError(f"max_tokens {s['max_tokens']} does not fit: {m.name}'s {block}-token block leaves "
                             f"room for {max(room, 0)} after this request")
    return request.strip(), history, s, task, models


def bind(host, port):
    """The server's socket, bound before any model loads: a bad address or a port in use is an error at once."""
    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # --host ::1
        daemon_threads = False  # server_close() waits for the answers under way: exiting under them aborts (134)
    return Server((host, port), BaseHTTPRequestHandler)  # serve() gives it its handler


def serve(ctx, server, host):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html"), "rb") as f:
        page = f.read()
    config = dict(models=[dict(name=m.name, stage=m.stage) for m in ctx.models], best_of=ctx.best_of, split=HELD_OUT,
                  reward=ctx.scorers and os.path.basename(os.path.normpath(ctx.scorers.dir)),  # no path of the machine
                  splits=list(PROMPT_SETS), settings=ctx.settings, max_body=MAX_BODY)
    port, name, stopping = server.server_address[1], f"[{host}]" if ":" in host else host, threading.Event()
    names = {"localhost", "127.0.0.1", "[::1]", name}  # what Host may say; any name for a wildcard address
    hosts = None if host in ("", "0.0.0.0", "::") else {f"{n}:{port}" for n in names} | (names if port == 80 else set())

    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT

        def refused(self):
            """Why a request is not this page's, or None. Host must name this server (DNS rebinding gives another
            site's name this address); an Origin, sent with every POST and cross-origin request, must be its own."""
            h, origin = self.headers.get("Host", "").lower(), self.headers.get("Origin")
            if hosts is not None and h not in hosts:
                return f"Host {h!r} is not this server"
            if origin is not None and origin.lower() != f"http://{h}":
                return f"Origin {origin!r} is not this server's page"

        def end_headers(self):  # on every reply: no other page may frame this one (clickjacking)
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            super().end_headers()

        def reply(self, code, data, kind="application/json"):
            data = data if isinstance(data, bytes) else json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url, q = urlparse(self.path), parse_qs(urlparse(self.path).query)
            if why := self.refused():
                return self.reply(403, dict(error=why))
            if url.path in ("/", "/api/config"):
                return self.reply(200, page, "text/html; charset=utf-8") if url.path == "/" else self.reply(200, config)
            if url.path != "/api/task":
                return self.reply(404, dict(error=f"no such page: {url.path}"))
            try:
                split, i = task_spec(f"{q.get('split', [HELD_OUT])[0]}:"
                                     f"{q.get('index', [random.randrange(TASK_LIMIT)])[0]}")
            except argparse.ArgumentTypeError as e:
                return self.reply(400, dict(error=str(e)))
            task = task_list(split, ctx.world_seed)[i]
            self.reply(200, dict(split=split, index=i, prompt=task.prompt, history=[list(t) for t in task.history]))

        def do_POST(self):
            length = int(n) if (n := self.headers.get("Content-Length", "")).isdigit() else -1
            try:  # the body is read before any reply, a refusal too: unread bytes behind a reply can reset it
                for _ in range(min(length, 64 * MAX_BODY) // MAX_BODY if length > MAX_BODY else 0):
                    self.rfile.read(MAX_BODY)
                body = self.rfile.read(length) if 0 <= length <= MAX_BODY else b""
            except TimeoutError:
                return self.reply(408, dict(error=f"the body did not come within {SOCKET_TIMEOUT} s"))
            if why := self.refused():
                return self.reply(403, dict(error=why))
            if urlparse(self.path).path != "/api/chat":
                return self.reply(404, dict(error=f"no such endpoint: {self.path}"))
            if self.headers.get_content_type() != "application/json":  # a form or a no-cors fetch cannot send it
                return self.reply(415, dict(error="the body must be sent as Content-Type: application/json"))
            if not 0 <= length <= MAX_BODY:
                return self.reply(413 if length > 0 else 411, dict(error=f"Content-Length must be 0 to {MAX_BODY}"))
            try:  # bad JSON is a ValueError, too deeply nested JSON a RecursionError
                request, history, s, task, models = parse_chat(ctx, json.loads(body or b"null"))
            except (ValueError, RecursionError, argparse.ArgumentTypeError) as e:
                return self.reply(400, dict(error=(str(e).splitlines() or [type(e).__name__])[0]))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()

            def emit(event):
                if stopping.is_set():  # Ctrl-C: this answer ends at its next token
                    raise ConnectionAbortedError
                self.wfile.write(json.dumps(event).encode() + b"\n")
                self.wfile.flush()
            with contextlib.suppress(ConnectionError, TimeoutError):  # the page went away, or the server stops
                answer_all(ctx, request, history, s, emit, task, models)

    server.RequestHandlerClass = Handler
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who reaches it can use it, with no password", file=sys.stderr)
    print(f"serving {', '.join(m.name for m in ctx.models)} on http://{name}:{port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    stopping.set()  # Ctrl-C
    server.server_close()  # waits for the answers under way, which end at their next token

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # models
    parser.add_argument("model", nargs="*", help="checkpoints or run folders to talk to; out/sft if none")
    parser.add_argument("--models", nargs="+", default=[], help="more of them; each answers every request")
    parser.add_argument("--reward_dir", help="the reward stage's folder (reward.pt, rules.pt): scores every answer")
    parser.add_argument("--best_of", type=int, default=0, help=f"add the best of N samples (N <= {MAX_BEST_OF}) of "
                        "the first chat model")
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
    parser.add_argument("--json", help="write every answer and its notes to this file (not with --serve)")
    parser.add_argument("--stats", action="store_true", help="show context size, time to first token and tokens/s")
    # the web page
    parser.add_argument("--serve", action="store_true", help="serve the chat page instead of the terminal")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (::1 too); anything but this "
                        "machine warns")
    parser.add_argument("--port", type=int, default=8000, help="port of the page (0: any free one)")
    args = parser.parse_args()
    for name in SETTINGS:
        try:
            check_setting(name, getattr(args, name))
        except ValueError as e:
            parser.error(f"argument --{name}: {e}")
    folder = os.path.dirname(os.path.abspath(args.json or "."))  # checked before any answer is generated
    for bad, message in ((not 0 <= args.best_of <= MAX_BEST_OF, f"--best_of: want 0 to {MAX_BEST_OF}, not "
                          f"{args.best_of}"),
                         (args.best_of and not args.reward_dir, "--best_of needs --reward_dir: the reward and rule "
                          "models pick the best sample"),
                         (args.serve and (args.json or args.prompt or args.task), "--json, --prompt and --task are for "
                          "the terminal; with --serve the page asks"),
                         (not 0 <= args.port <= 65535, f"--port: want 0 to 65535, not {args.port}"),
                         (args.json and not (os.path.isdir(folder) and os.access(folder, os.W_OK)),
                          f"--json: cannot write into {folder} (no such folder?)")):
        if bad:
            parser.error(message)
    try:
        device, _ = setup_device(args.device)  # fp32 even on a GPU: one sequence at a time is bound by latency
        torch.empty(0, device=device)  # a device this machine lacks fails here, not inside a checkpoint's load
    except (RuntimeError, AssertionError) as e:  # torch says so with either
        parser.error(f"--device: {args.device} is not usable here ({' '.join(str(e).split()).partition('. ')[0]})")

    paths = args.model + args.models or [os.path.join("out", "sft")]
    where = os.path.dirname(os.path.abspath(find_checkpoint(paths[0])))
    tokenizer = args.tokenizer or next((p for p in (os.path.join(d, "tokenizer.json") for d in (
        where, os.path.dirname(where))) if os.path.exists(p)), os.path.join("out", "tokenizer.json"))
    try:
        server = bind(args.host, args.port) if args.serve else None
    except OSError as e:  # a name that does not resolve, a port in use or not ours to take
        sys.exit(f"chat.py: cannot serve on {args.host}:{args.port}: {e.strerror or e}")
    try:
        for p in [find_checkpoint(p) for p in paths] + [tokenizer]:
            if not os.path.isfile(p):
                raise CheckpointError(f"not found: {p} (run the stage that writes it first, or pass another path)")
        if zipfile.is_zipfile(tokenizer):  # torch writes checkpoints as zip files
            raise CheckpointError(f"{tokenizer} is a checkpoint, not a tokenizer: pass the tokenizer.json of its run")
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
    except (CheckpointError, ValueError) as e:  # load_tokenizer's ValueError: a file that is no tokenizer
        sys.exit(f"chat.py: {e}")
    if args.serve:
        serve(ctx, server, args.host)
        sys.exit()
    one_shot, record = args.prompt or args.task, [] if args.json else None  # one-shot: each in a new conversation
    lines = [x for p in args.prompt for x in (p, "/reset")] + ["/task %s:%d" % t for t in args.task]
    # labelled where answers would run together: several requests or models at once, or requests from a pipe
    label = (len(ctx.models) > 1 or args.best_of or len(lines) > 2) if one_shot else not sys.stdin.isatty()
    try:
        run_terminal(ctx, dict(ctx.settings), lines if one_shot else typed_lines(), args.stats, label, record)
    except BrokenPipeError:  # `| head -1`: the reader has gone, so stop, quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and Python's last flush finds no pipe
        sys.exit(1)
    if args.json:
        write_json(args.json, dict(models={m.name: m.path for m in ctx.models}, reward_dir=args.reward_dir,
                                   best_of=args.best_of, settings=ctx.settings, world_seed=args.world_seed,
                                   requests=record))
