"""The toolset (LaMDA, Sparrow): a documentation lookup and a calculator, the world of factual
questions they answer, demonstrations that call them and quote their evidence, and the gold judge.

LaMDA (Thoppilan et al. 2022) calls a toolset in the middle of an answer and conditions on what
comes back; Sparrow (Glaese et al. 2022) quotes the evidence it retrieved. Ours: the assistant writes
<|call|>lookup: json.dumps<|/call|> or <|call|>calc: 3847 * 592<|/call|>, the engine (model.generate
with a ToolRunner) forces <|result|>TEXT<|/result|> into the row, and the answer states the fact
and quotes its evidence verbatim from the result: `width` defaults to `70`: "wrap(text, width=70, **kwargs)".

The docs are the standard library's own, read with `ast` (never imported: imports have side
effects): each public function, class and method's signature and first docstring paragraph. Entries
of validation files (data.is_val) are held out: no pretraining text holds them, so a closed-book
model cannot have memorized them. LaMDA answered open questions judged by people; ours have exact
answers (a default, the parameter names, the required count, the first sentence, a big sum or
product), so the judge is a program: right, and attributable (the quote occurs verbatim in the
right entry's docs, as in AIS, Rashkin et al. 2021).

    python tools.py --out_dir out/docs   # build and cache the index (out/docs/index.json); counts, examples
"""
import argparse
import ast
import hashlib
import json
import math
import operator
import os
import random
import re
import sys
import time
from collections import defaultdict, namedtuple
from statistics import fmean

import torch

from common import atomic_write, write_json
from data import (CALL, CALL_END, END, RESULT, RESULT_END, SPECIAL_TOKENS, encode_chat, is_val, render_response, segments,
                  stdlib_sources)
from model import induction_test
from judge import sample_responses

MAX_RESULT = 300     # characters of a tool result: prompt + call + result + answer fit in 256 tokens
MAX_SIGNATURE = 100  # entries with longer signatures get no questions (their evidence would not fit)
FACT_MAX_NEW_TOKENS = 200  # a factual answer, its tool result included (a result alone can take 100 tokens)

# -----------------------------------------------------------------------------
# the documentation index, built from the standard library's source

# params: ((name, default's source or None, kind), ...), kind 'posonly' 'pos' '*' 'kwonly' '**', without
# self or cls; None where unknown (a class with no __init__ or __new__ of its own)
Entry = namedtuple("Entry", "name signature doc path heldout params")


def _parameters(args, drop_first):
    pos = args.posonlyargs + args.args
    defaults = [None] * (len(pos) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    params = [(a.arg, d, "posonly" if i < len(args.posonlyargs) else "pos")
              for i, (a, d) in enumerate(zip(pos, defaults))]
    if params and (drop_first or params[0][0] in ("self", "cls")):
        params = params[1:]
    params += [(args.vararg.arg, None, "*")] if args.vararg else []
    params += [(a.arg, d and ast.unparse(d), "kwonly") for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return tuple(params + ([(args.kwarg.arg, None, "**")] if args.kwarg else []))


STARS = {"*": "*", "**": "**"}


def render(params):
    """'a, b=1, /, *args, key=None, **kw' (annotations left out: short, like the docs)."""
    parts = []
    for i, (name, default, kind) in enumerate(params):
        if kind == "kwonly" and not any(k in ("*", "kwonly") for _, _, k in params[:i]):
            parts.append("*")
        parts.append(STARS.get(kind, "") + name + ("" if default is None else f"={default}"))
        if kind == "posonly" and (i + 1 == len(params) or params[i + 1][2] != "posonly"):
            parts.append("/")
    return ", ".join(parts)


def _entry(name, node, path, is_method):
    doc = neutralize(" ".join(re.split(r"\n\s*\n", (ast.get_docstring(node) or "").strip())[0].split()))
    decorators = [ast.unparse(d) for d in node.decorator_list]
    if not doc or any(d.endswith(("property", ".setter", ".getter", ".deleter", "overload")) for d in decorators):
        return None  # undocumented, or an attribute rather than a call
    if isinstance(node, ast.ClassDef):  # a class is called with its __init__'s (or __new__'s) parameters
        init = next((n for name_ in ("__init__", "__new__") for n in node.body
                     if isinstance(n, ast.FunctionDef) and n.name == name_), None)
        params = init and _parameters(init.args, True)
    else:
        params = _parameters(node.args, is_method and "staticmethod" not in decorators)
    signature = neutralize(f"{name}({'...' if params is None else render(params)})")
    return Entry(name, signature, doc, path, is_val(path), params)


def entries_of(path, source):
    """One file's entries: public top-level functions and classes, and public methods of public
    classes, that have a docstring; path is relative to the stdlib ('json/decoder.py': json.decoder)."""
    module = path.replace(os.sep, "/")[:-3].replace("/", ".").removesuffix(".__init__")
    if any(part.startswith("_") for part in module.split(".")):  # private modules, __main__
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    funcs, out = (ast.FunctionDef, ast.AsyncFunctionDef), []
    for node in tree.body:
        if isinstance(node, funcs + (ast.ClassDef,)) and not node.name.startswith("_"):
            out.append(_entry(f"{module}.{node.name}", node, path, False))
            if isinstance(node, ast.ClassDef):
                out += [_entry(f"{module}.{node.name}.{m.name}", m, path, True) for m in node.body
                        if isinstance(m, funcs) and not m.name.startswith("_")]
    return [e for e in out if e is not None]


class DocIndex:
    """The entries (sorted by name) and what lookup searches: full names, last name components,
    words (weighted by inverse document frequency, so that rare words count more)."""

    def __init__(self, entries):
        # a name defined twice: the last wins
        self.entries = sorted({e.name: e for e in entries}.values())
        self.by_name = {e.name: e for e in self.entries}
        self.by_last, self.postings = defaultdict(list), defaultdict(dict)  # word -> {entry: 2 in name, 1 in docs}
        for i, e in enumerate(self.entries):
            self.by_last[e.name.rsplit(".", 1)[-1].lower()].append(e)
            for weight, text in ((1, e.doc), (2, e.name)):
                for w in _words(text):
                    self.postings[w][i] = weight
        self.idf = {w: math.log(len(self.entries) / len(ids)) for w, ids in self.postings.items()}

    def search(self, query):
        """Entries best first: the exact full name, else the same last component (the query as a
        suffix first), else the most shared words by idf weight; ties by shorter, then smaller name."""
        if query in self.by_name:
            return [self.by_name[query]]
        last, suffix = self.by_last.get(query.rsplit(".", 1)[-1].lower()), f".{query}".lower()
        if last:
            return sorted(last, key=lambda e: (not f".{e.name}".lower().endswith(suffix), len(e.name), e.name))
        scores = defaultdict(float)
        for w in sorted(set(_words(query))):  # a fixed order: float sums must not depend on set order
            for i, weight in self.postings.get(w, {}).items():
                scores[i] += weight * self.idf[w]
        best = sorted(scores, key=lambda i: (-scores[i], len(self.entries[i].name), self.entries[i].name))
        return [self.entries[i] for i in best[:5]]


STOPWORDS = set("an and are as at be by for from if in is it its not of on or that the this to with".split())


def _words(text):
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1 and w not in STOPWORDS]


def build_index(sources=None):
    """The index of the standard library (data.stdlib_sources()), or of the given (path, source) pairs."""
    return DocIndex([e for path, source in (stdlib_sources() if sources is None else sources)
                     for e in entries_of(path, source)])


def load_index(path=None):
    """The index, read from a JSON cache at path if there is one, else built (and cached there). A
    cache from another Python or another version of this file or data.py is rebuilt; a malformed one is an
    error, not a silent rebuild."""
    digest = hashlib.md5()
    for file in (__file__, sys.modules["data"].__file__):  # data.py decides the split
        with open(file, "rb") as f:
            digest.update(f.read())
    built_by = f"{sys.version} {sys.prefix} {digest.hexdigest()}"
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                state = json.load(f)
            if state["built_by"] == built_by:
                return DocIndex([Entry(n, s, d, p, bool(h), None if ps is None else tuple(map(tuple, ps)))
                                 for n, s, d, p, h, ps in state["entries"]])
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a documentation index ({e!r}): delete it and it will be rebuilt") from e
    index = build_index()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path) as f:
            json.dump(dict(built_by=built_by, entries=index.entries), f)
    return index

# -----------------------------------------------------------------------------
# the tools: lookup, calculate, and run_tool, which parses a call and never raises


def neutralize(text):
    """Tool results are untrusted text: no '<|...|>' in them may read like a special token."""
    return text.replace("<|", "< |").replace("|>", "| >")


def _cap(text, limit=MAX_RESULT):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def page(entry):
    """What a lookup shows of an entry: its signature, then its first paragraph."""
    return _cap(f"{entry.signature}\n{entry.doc}")


def lookup(index, query):
    """The best match's signature and first paragraph, then other matches' names where they fit."""
    query = " ".join(query.split()).strip("`'\" ").removesuffix("()")
    hits = index.search(query) if query else []
    if not hits:
        return f"no entry found for '{_cap(query, 60)}'"
    text, also = page(hits[0]), [e.name for e in hits[1:4]]
    while also and len(text) + len("\nalso: " + ", ".join(also)) > MAX_RESULT:
        also.pop()
    return text + ("\nalso: " + ", ".join(also) if also else "")


OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_MAGNITUDE, MAX_EXPONENT, MAX_EXPRESSION = 10**30, 64, 100


def _arithmetic(node):
    """Walk the parsed expression, allowing numbers and arithmetic only: never eval."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arithmetic(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
    elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        a, b = _arithmetic(node.left), _arithmetic(node.right)
        # bound the work before doing it: 9 ** 9 ** 9 would take minutes and gigabytes
        if isinstance(node.op, ast.Pow) and (abs(b) > MAX_EXPONENT or abs(a) > 1 and b * math.log10(abs(a)) > 30):
            raise ValueError("exponent too large")
        value = OPERATORS[type(node.op)](a, b)
    else:
        raise ValueError("only numbers, parentheses and + - * / // % ** are allowed")
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("result too large or not a real number")
    return value


def calculate(expression):
    """Arithmetic on numbers, as text ('2277424'), or a short error message."""
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION:
        return f"calc takes an arithmetic expression of 1 to {MAX_EXPRESSION} characters"
    try:
        value = _arithmetic(ast.parse(expression, mode="eval").body)
    except ZeroDivisionError:
        return "division by zero"
    except ValueError as e:  # our own messages
        return f"cannot calculate: {e}"
    except (SyntaxError, RecursionError, MemoryError, OverflowError, TypeError):
        return "cannot calculate: not an arithmetic expression"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.10g}"
    return str(value)


def run_tool(index, call_text):
    """The result of a call's text ('lookup: QUERY' or 'calc: EXPRESSION'): capped, neutralized, a
    short message for anything malformed; never raises."""
    try:
        tool, colon, arg = call_text.partition(":")
        tool = tool.strip().lower()
        if not colon:
            result = "malformed call: write lookup: NAME or calc: EXPRESSION"
        elif tool in ("lookup", "calc"):
            result = lookup(index, arg) if tool == "lookup" else calculate(arg)
        else:
            result = f"unknown tool '{_cap(tool, 20)}': the tools are lookup and calc"
    except Exception:  # a bug in a tool must not stop generation
        result = "tool error"
    return _cap(neutralize(result))


class ToolRunner:
    """The tools in model.generate: when a row samples CALL_END, runner(the row's response tokens so
    far) returns the tokens to force: RESULT, the result as ordinary tokens, RESULT_END; forcing() feeds
    them in. runner.calls logs every (call text, result text); per row, the decoded response holds the
    same calls and results in place, and parse_calls reads them back."""

    def __init__(self, enc, index):
        self.enc, self.index, self.calls = enc, index, []
        self.call_id, self.call_end_id, self.result_id, self.result_end_id = (
            enc.encode_single_token(t) for t in (CALL, CALL_END, RESULT, RESULT_END))

    def __call__(self, response_tokens):
        tokens = list(response_tokens)
        end = len(tokens) - 1 if tokens and tokens[-1] == self.call_end_id else len(tokens)
        start = next((i for i in range(end - 1, -1, -1) if tokens[i] in (self.call_id, self.result_end_id)), None)
        if start is None or tokens[start] != self.call_id:  # no call opened since the last result
            call, result = None, "malformed call: no call was opened"
        else:
            call = self.enc.decode(tokens[start + 1:end])
            result = run_tool(self.index, call)
        self.calls.append((call, result))
        return [self.result_id, *self.enc.encode_ordinary(result), self.result_end_id]

    def forcing(self, n_rows):
        """What model.generate_stream calls at each step of one generation of n_rows prompts: force(rows,
        tokens, logprobs) gives each row in the middle of a tool's result that result's next token instead of
        its sample, and runs the call of a row that just sampled CALL_END (its result comes next, one token a
        step, while the other rows keep sampling). Returns (tokens, logprobs with 0 where forced, forced)."""
        responses, queued = [[] for _ in range(n_rows)], {}  # per prompt: its tokens so far, result tokens to come

        def force(rows, tokens, logprobs):
            tokens, forced = tokens.tolist(), [False] * len(tokens)
            for j, row in enumerate(rows.tolist()):
                if queued.get(row):
                    tokens[j], forced[j] = queued[row].pop(0), True
                responses[row].append(tokens[j])
                if tokens[j] == self.call_end_id and not forced[j]:
                    queued[row] = self(responses[row])
            forced = torch.tensor(forced, device=logprobs.device)
            return torch.tensor(tokens, device=logprobs.device), logprobs.masked_fill(forced, 0.0), forced
        return force

# -----------------------------------------------------------------------------
# the world of factual questions, with exact answers and held-out modules

# prompt; answer: the exact fact, as the response must state it; kind: one of KINDS; name: the entry's
# full name (None for arithmetic); subject: what the claim is about (a parameter, a short name, an
# expression); evidence: what the quote must hold (a span of the entry's docs, or the calculator's
# result); query: the call a demonstration makes ('lookup: NAME' or 'calc: EXPRESSION')
Question = namedtuple("Question", "prompt answer kind name subject evidence query")
TEMPLATES = {
    "default": ("What is the default value of `{p}` in `{name}`?", "In `{name}`, what does `{p}` default to?",
                "If I call `{name}` without `{p}`, what is `{p}`?", "What default does `{name}` give `{p}`?"),
    "params": ("What are the parameters of `{name}`?", "List the parameter names of `{name}`, in order.",
               "Which arguments does `{name}` accept?", "What are the parameters of `{name}` called?"),
    "required": ("How many positional arguments does `{name}` require?",
                 "How many required positional parameters does `{name}` have?",
                 "At least how many positional arguments must a call to `{name}` pass?"),
    "summary": ("What does `{name}` do?", "What is the first sentence of the docs of `{name}`?",
                "Describe `{name}` in one sentence from its documentation."),
    "product": ("What is {a} * {b}?", "Compute {a} times {b}.", "What do you get when you multiply {a} by {b}?",
                "How much is {a} * {b}, exactly?"),
    "sum": ("What is {expr}?", "Compute {expr}.", "Add up {words}.", "What is the sum of {words}?"),
}
KINDS = tuple(TEMPLATES)
CLAIMS = {"default": "`{subject}` defaults to `{answer}`", "params": "`{subject}` takes `{answer}`",
          "required": "`{subject}` requires `{answer}` positional argument{s}", "summary": "`{subject}` says",
          "product": "`{subject}` is `{answer}`", "sum": "`{subject}` is `{answer}`"}


def facts_of(entry):
    """(kind, answer, subject, evidence, parameter) of each question the entry settles exactly."""
    params, short = entry.params, entry.name.rsplit(".", 1)[-1]
    if params is None or len(entry.signature) > MAX_SIGNATURE:
        return []
    sig = entry.signature[len(entry.name) - len(short):]  # 'wrap(text, width=70, **kwargs)'
    # the quoted evidence is the whole signature: 'dir=None' alone could be guessed without looking anything up
    out = [("default", d, p, sig, p) for p, d, _ in params if d and len(d) <= 20 and not set(d) & set('`"\n')]
    if 1 <= len(params) <= 5:
        out.append(("params", ", ".join(STARS.get(k, "") + p for p, _, k in params), short, sig, None))
    if all(d is not None for _, d, k in params if k == "kwonly"):  # else 'required' would not be just positional
        out.append(("required", str(sum(d is None for _, d, k in params if k in ("posonly", "pos"))), short, sig, None))
    m = re.match(r"(.{15,100}?[.!?])(\s|$)", entry.doc)
    out += [("summary", m[1], short, m[1], None)] if m else []
    return [fact for fact in out if fact[3] in page(entry)]  # the evidence is in what a lookup shows


def _arithmetic_question(kind, rng):
    digits = lambda lo, hi: rng.randint(10 ** (lo - 1), 10 ** hi - 1)  # noqa: E731
    nums = [digits(3, 4), digits(2, 3)] if kind == "product" else [digits(3, 4) for _ in range(rng.choice((2, 3)))]
    expr, words = (" * " if kind == "product" else " + ").join(map(str, nums)), ", ".join(map(str, nums[:-1]))
    prompt = rng.choice(TEMPLATES[kind]).format(a=nums[0], b=nums[-1], expr=expr, words=f"{words} and {nums[-1]}")
    return Question(prompt, calculate(expr), kind, None, expr, calculate(expr), f"calc: {expr}")


def make_questions(index, split, n, seed, kinds=KINDS):
    """n questions, deterministic in (split, n, seed, kinds): 'train' about entries of training files,
    'heldout' about entries of validation files, arithmetic in both. Each question draws its kind
    uniformly; a kind's facts are dealt like a shuffled deck, without repeats until it runs out."""
    assert split in ("train", "heldout"), split
    rng, pools, decks, questions = random.Random(f"{split}:{seed}"), defaultdict(list), defaultdict(list), []
    for e in index.entries:
        for kind, *fact in facts_of(e) if e.heldout == (split == "heldout") else ():
            pools[kind].append((e, fact))
    while len(questions) < n:
        kind = rng.choice(kinds)
        if kind in ("product", "sum"):
            questions.append(_arithmetic_question(kind, rng))
            continue
        if not decks[kind]:
            if not pools[kind]:
                raise ValueError(f"no {kind} questions in split {split}")
            decks[kind] = rng.sample(pools[kind], len(pools[kind]))
        e, (answer, subject, evidence, p) = decks[kind].pop()
        prompt = rng.choice(TEMPLATES[kind]).format(name=e.name, p=p)
        questions.append(Question(prompt, answer, kind, e.name, subject, evidence, f"lookup: {e.name}"))
    return questions


# The question sets, by name: (split, offset added to the run's seed), as tasks.PROMPT_SETS for the
# programming requests: every program draws its questions through question_set(), so that sft.py and the
# export of its data (examples/export.py) ask the same questions by construction.
QUESTION_SETS = {
    'sft_train': ('train', 50),    # the factual demonstrations SFT mixes in
    'sft_eval': ('heldout', 51),   # questions about held-out modules: what the report measures
    'rl_train': ('train', 52),     # ppo.py --reward evidence's rollout prompts: other draws than SFT's
}


def question_set(index, name, n, seed):
    """The first n questions of a named question set (deterministic in name, n and seed)."""
    split, offset = QUESTION_SETS[name]
    return make_questions(index, split, n, seed + offset)

# -----------------------------------------------------------------------------
# demonstrations (Sparrow: the answer, then its evidence quoted) and the gold judge


def answer_text(question):
    """The formulaic answer: a claim with the fact in backticks, then the evidence in quotes."""
    claim = CLAIMS[question.kind].format(subject=question.subject, answer=question.answer,
                                         s="" if question.answer == "1" else "s")
    return f'{claim}: "{question.evidence}"'


def demonstrate_fact(index, question, use_tools):
    """A demonstration as response segments: the call, the result exactly as run_tool returns it,
    the answer; closed-book, the same answer alone, which the model must produce from memory."""
    answer = [("text", answer_text(question))]
    return [("call", question.query), ("result", run_tool(index, question.query))] + answer if use_tools else answer


def parse_calls(text):
    """(the (call, result) pairs, the answer after the last of them, its working left out) of a decoded
    response, read through data.segments: each call with the result right after it, or None where none came."""
    parts = segments(text)
    calls, rest = [], 0
    for i, (kind, call) in enumerate(parts):
        if kind == "call":
            result = parts[i + 1][1] if i + 1 < len(parts) and parts[i + 1][0] == "result" else None
            calls.append((call, result))
            rest = i + 1 + (result is not None)
    answer = render_response([(kind, text) for kind, text in parts[rest:] if kind != "work"])  # working is not said
    return calls, answer.split(END)[0].strip()


def judge_fact(index, question, response):
    """The gold judge of one response, decoded text with its special tokens in place (or segments):
    right: the stated answer (the claim's last `...`; for 'summary', the quote) is the exact fact;
    attributable: the quote holds the evidence and occurs verbatim in the right entry's signature or
    first paragraph (arithmetic: it is the calculator's result); found: a call returned the right
    entry (or value). failure, unless right and attributable: 'no answer' (nothing stated), 'bad
    copy' (right, but the quote is not the evidence), 'no call', 'wrong query' (no call found it),
    'ignored result' (a call found it, the answer says otherwise)."""
    calls, answer = parse_calls(response if isinstance(response, str) else render_response(response))
    claim, colon, quote = answer.partition(': "')
    quote = (quote[:quote.rindex('"')] if '"' in quote else quote.strip()) if colon else None
    stated = quote if question.kind == "summary" else (re.findall(r"`([^`]*)`", claim) or [None])[-1]
    right = stated == question.answer
    if question.name is None:  # arithmetic
        truth = calculate(question.subject)
        attributable, found = quote == truth, any((r or "").strip() == truth for _, r in calls)
    else:
        e = index.by_name[question.name]
        attributable = bool(quote) and question.evidence in quote and (quote in e.signature or quote in e.doc)
        found = any(e.signature in (r or "") for _, r in calls)
    failure = (None if right and attributable else "no answer" if stated is None else "bad copy" if right
               else "no call" if not calls else "wrong query" if not found else "ignored result")
    return dict(right=right, attributable=attributable, calls=len(calls), found=found, failure=failure,
                stated=stated, quote=quote)


def fact_answer_tokens(prompts, block_size):
    """The tokens a factual answer may take: FACT_MAX_NEW_TOKENS, or what the longest prompt leaves of the block."""
    return min(FACT_MAX_NEW_TOKENS, block_size - max(len(p) for p in prompts))


def facts_line(f):
    """evaluate_facts' verdicts in a line, for the stages' logs."""
    return (f"held-out facts ({len(f['right'])}): right {fmean(f['right']):.1%} | attributable "
            f"{fmean(f['attributable']):.1%} | right and attributable "
            f"{fmean(a and b for a, b in zip(f['right'], f['attributable'])):.1%} | found {fmean(f['found']):.1%} | "
            f"calls per answer {fmean(f['calls']):.2f}")


def evaluate_facts(model, enc, index, questions, max_new_tokens):
    """The gold judge on a chat model's greedy answers, generated with the toolset at hand (a
    closed-book model may call it too; it was never shown how): per question, right, attributable,
    its calls and whether one found the right entry; the failures by kind; a few exchanges."""
    runner = ToolRunner(enc, index)
    prompts = [encode_chat(enc, q.prompt)[0] for q in questions]
    responses = sample_responses(model, enc, prompts, 1, 0.0, max_new_tokens, tool_runner=runner)
    verdicts = [judge_fact(index, q, r["text"]) for q, r in zip(questions, responses)]
    out = {key: [v[key] for v in verdicts] for key in ("right", "attributable", "calls", "found", "failure")}
    induction = fmean(induction_test(model, torch.arange(model.config.vocab_size - len(SPECIAL_TOKENS))))
    return dict(out, kinds=[q.kind for q in questions], induction=induction, exchanges=[
        dict(prompt=q.prompt, response=r["text"], **v) for q, r, v in list(zip(questions, responses, verdicts))[:40]])


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="build the documentation index; print counts and examples")
    parser.add_argument("--out_dir", default=None, help="cache the index here as index.json, with a summary.json "
                        "of its counts (default: build only)")
    args = parser.parse_args()
    t0 = time.time()
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    index = load_index(os.path.join(args.out_dir, "index.json") if args.out_dir else None)
    print(f"{len(index.entries):,} entries, {sum(e.heldout for e in index.entries):,} held out, "
          f"in {time.time() - t0:.1f}s")
    if args.out_dir:
        write_json(os.path.join(args.out_dir, "summary.json"), dict(
            entries=len(index.entries), heldout=sum(e.heldout for e in index.entries), seconds=time.time() - t0))
    for held in (False, True):
        kinds = [f[0] for e in index.entries if e.heldout == held for f in facts_of(e)]
        print(f"{'heldout' if held else 'train'} facts: " + " | ".join(f"{k} {kinds.count(k):,}" for k in KINDS[:4]))
    for q in make_questions(index, "heldout", 4, seed=0):
        print(f"\n{q.prompt}\n{render_response(demonstrate_fact(index, q, True))}")
