"""
Tokens and batches: the two corpora, a byte-level BPE tokenizer trained here, token files on
disk, the chat format, and batches.

The embedded default needs no network: both corpora come from the Python that runs this file.
  generic text: the standard library's docstrings and comments, and the pydoc topics (English prose)
  domain text:  the standard library's Python source, tests excluded (as Codex continued GPT-3 on code)
Both are split into train and validation by file, the same split for both, so no validation
file's docstrings leak into the generic training set.

The tokenizer is byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant) with GPT-4's
regex pre-split: `train_bpe_simple` is minbpe's training loop as it reads, `train_bpe` the same
merges fast; they save to one JSON file, which `load_tokenizer` turns into a `tiktoken.Encoding`, so
encoding runs at tiktoken's speed. `bpe_encode` is the same algorithm in a few lines of Python, the
reference the tests hold tiktoken to.

    python data.py                                              # the embedded default
    python data.py --generic_corpus notes/ --domain_corpus src/  # your own files or folders

Your own demonstrations, preference pairs and prompts are read here too (read_demos, read_pairs,
read_prompts), in the JSON Lines formats of Hugging Face TRL; see "your own data" below.
"""
import argparse
import ast
import base64
import hashlib
import heapq
import io
import json
import math
import os
import sysconfig
import time
import tokenize
from collections import Counter, defaultdict

import numpy as np
import regex  # installed with tiktoken; unlike `re` it knows \p{L} (letters) and \p{N} (digits)
import tiktoken
import torch
from tqdm import tqdm

from common import atomic_write, print0, write_json

# GPT-4's pre-split (cl100k_base): contractions, words with one leading non-letter, numbers of up
# to 3 digits, punctuation runs, newlines, spaces. BPE never merges across these chunks, so a
# token never spans a word and its neighbour's space.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# Galactica (Taylor et al. 2022, sec. 3) and LLaMA split numbers into single digits, so that every number
# is spelled by the same ten tokens and 1234 is never one token and 1235 two (data.py --split_digits)
DIGIT_SPLIT_PATTERN = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
EOT, USER, ASSISTANT, END = "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"
CALL, CALL_END, RESULT, RESULT_END, WORK, WORK_END = ("<|call|>", "<|/call|>", "<|result|>", "<|/result|>",
                                                     "<|work|>", "<|/work|>")
# documents end with EOT; chats use USER, ASSISTANT and END; the assistant writes a tool call (LaMDA's
# toolset) as CALL query CALL_END, the tool its RESULT text RESULT_END; WORK steps WORK_END is working
# memory, a calculation worked step by step before the answer (Galactica's <work>, Taylor et al. 2022)
SPECIAL_TOKENS = (EOT, USER, ASSISTANT, END, CALL, CALL_END, RESULT, RESULT_END, WORK, WORK_END)
VAL_EVERY = 20  # one file in 20 goes to validation

# -----------------------------------------------------------------------------
# corpora: {"train": [documents], "val": [documents]}


def is_val(name):
    """The split, by a hash of the file's name: stable across machines and runs."""
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % VAL_EVERY == 0


def stdlib_sources(root=None):
    """(relative path, source) for the standard library's Python files (or those under root),
    tests and installed packages excluded."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test")
                             and not d.startswith("test_"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    out.append((os.path.relpath(path, root), f.read()))
    return out


def prose_of(source):
    """The English in a Python file: its docstrings and comments, in source order."""
    pieces = []  # (line, text)
    try:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and node.body:
                    pieces.append((node.body[0].lineno, doc))
        comment, last = [], -2
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if not regex.search(r"\p{L}", text) or text.startswith("!"):  # rulers, shebangs
                continue
            if tok.start[0] != last + 1 and comment:  # a gap ends a paragraph of comments
                pieces.append((comment[0][0], " ".join(t for _, t in comment)))
                comment = []
            comment.append((tok.start[0], text))
            last = tok.start[0]
        if comment:
            pieces.append((comment[0][0], " ".join(t for _, t in comment)))
    except (SyntaxError, tokenize.TokenError, ValueError):  # a few stdlib files are deliberately broken
        pass
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def default_corpora(installed=False, max_chars=0):
    """The embedded default, built from this Python installation (about 4 MB and 12 MB); with
    installed, also the source and prose of every installed package (the gpu preset's corpus: about
    85 MB of source with this project's requirements). With max_chars, a generic split stops reading
    prose once it holds what data.py keeps of it (first_chars): the same corpus, in half the time."""
    import pydoc_data.topics
    generic, domain = {"train": [], "val": []}, {"train": [], "val": []}
    wanted = {"train": max_chars or math.inf, "val": max_chars // VAL_EVERY or math.inf}
    sources = stdlib_sources()
    if installed:  # the packages' names carry a prefix, so their split never follows a stdlib file's
        roots = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
        sources += [(f"site:{name}", source) for root in roots for name, source in stdlib_sources(root)]
    for name, source in sources:
        split = "val" if is_val(name) else "train"
        domain[split].append(source)
        prose = prose_of(source) if sum(map(len, generic[split])) < wanted[split] else ""
        if prose:
            generic[split].append(prose)
    for name, text in sorted(pydoc_data.topics.topics.items()):
        generic["val" if is_val(f"pydoc:{name}") else "train"].append(text)
    return {"generic": generic, "domain": domain}


def read_corpus(path):
    """A user corpus: one text file, or a folder of them (files that are not UTF-8 are skipped).
    A folder splits by file like the default; a single file gives its last lines to validation."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus not found: {path}")
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    docs = {}
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs[os.path.relpath(file, path) if file != path else os.path.basename(file)] = text
    if not docs:
        raise ValueError(f"corpus {path} has no text: no non-empty UTF-8 file in it")
    corpus = {"train": [], "val": []}
    for name, text in docs.items():
        corpus["val" if is_val(name) else "train"].append(text)
    if not corpus["train"] or not corpus["val"]:  # too few files to split by file: split by lines
        corpus = {"train": [], "val": []}
        for text in docs.values():
            lines = text.splitlines(keepends=True)
            cut = len(lines) - max(1, len(lines) // VAL_EVERY)
            corpus["train"].append("".join(lines[:cut]))
            corpus["val"].append("".join(lines[cut:]))
    return corpus


def first_chars(docs, n):
    """The first n characters of a corpus: whole documents, then the start of the next one."""
    kept = []
    for doc in docs:
        if n <= 0:
            break
        kept.append(doc[:n])
        n -= len(kept[-1])
    return kept


# -----------------------------------------------------------------------------
# the tokenizer: byte-level BPE


def merge(ids, pair, new_id):
    """ids with every occurrence of pair, left to right, replaced by new_id (minbpe's merge)."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe_simple(docs, vocab_size):
    """BPE's merges by minbpe's loop as it reads (Karpathy's minbpe, RegexTokenizer.train): count
    every adjacent pair within the chunks of the pre-split, merge the most frequent one everywhere, repeat.
    Each merge recounts the whole corpus, so it takes minutes where train_bpe, below, takes seconds; the
    tests hold the two to the same merges. Returns the new tokens' bytes, in merge order."""
    chunks = [list(chunk.encode("utf-8")) for doc in docs for chunk in regex.findall(SPLIT_PATTERN, doc)]
    vocab = [bytes([i]) for i in range(256)]  # token id -> its bytes
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        counts = Counter(pair for ids in chunks for pair in zip(ids, ids[1:]))
        # a pair whose bytes are already a token, reached by other pairs ((ab, c) vs (a, bc)), would give those
        # bytes a second id, which tiktoken's table of bytes -> id cannot hold
        known = set(vocab)
        counts = {p: n for p, n in counts.items() if vocab[p[0]] + vocab[p[1]] not in known}
        pair = min(counts, key=lambda p: (-counts[p], p), default=None)  # the most frequent; a tie: the smallest ids
        if pair is None or counts[pair] < 2:  # a pair that occurs once is not worth a token
            break
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        chunks = [merge(ids, pair, len(vocab) - 1) for ids in chunks]
    return vocab[256:]


def train_bpe(docs, vocab_size, pattern=SPLIT_PATTERN):
    """Learn BPE merges from documents: the new tokens' bytes, in merge order (rank 256, 257, ...).

    train_bpe_simple's loop, made fast in three ways: counting is over unique chunks of the pre-split
    (a chunk that occurs 10,000 times is one word of weight 10,000); after a merge only the words that
    held the pair are touched, found through an index from pair to words, and only their pairs' counts
    change; and a heap gives the most frequent pair. Ties break toward the smallest pair of ids, so
    training is deterministic."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    pattern = regex.compile(pattern)
    chunks = Counter()
    for doc in tqdm(docs, desc="pre-split", leave=False):
        chunks.update(pattern.findall(doc))
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    weights = list(chunks.values())
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)

    # count: every adjacent pair, weighted by how often its word occurs; remember where it occurs
    counts, where = defaultdict(int), defaultdict(set)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            counts[pair] += weights[w]
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    progress = tqdm(total=n_merges, desc="bpe merges", leave=False)
    while len(vocab) < 256 + n_merges and heap:
        # pick the best pair: the heap's top, unless its count changed since it was pushed
        neg_count, pair = heapq.heappop(heap)
        if -neg_count != counts.get(pair) or -neg_count < 2:
            continue  # a stale entry, or a pair that occurs once: not worth a token
        del counts[pair]
        token = vocab[pair[0]] + vocab[pair[1]]
        if token in known:
            # the same bytes were already reached by another pair ((ab, c) vs (a, bc)); tiktoken
            # maps bytes to one id, so a second id for them could never be produced
            continue
        new_id = len(vocab)
        vocab.append(token)
        known.add(token)
        progress.update()
        # merge it in every word that holds it, and update the counts of the pairs that changed
        changed = set()
        for w in where.pop(pair):
            word, merged = words[w], merge(words[w], pair, new_id)
            if len(merged) == len(word):
                continue  # the index is allowed to be stale: this word lost the pair earlier
            for p in zip(word, word[1:]):
                counts[p] -= weights[w]
                changed.add(p)
            for p in zip(merged, merged[1:]):
                counts[p] += weights[w]
                where[p].add(w)
                changed.add(p)
            words[w] = merged
        counts.pop(pair, None)
        for p in changed:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    progress.close()
    return vocab[256:]


def save_tokenizer(path, merged_tokens, pattern=SPLIT_PATTERN):
    state = dict(pattern=pattern, special_tokens=list(SPECIAL_TOKENS),
                 merged_tokens=[base64.b64encode(t).decode("ascii") for t in merged_tokens])
    with atomic_write(path) as f:
        json.dump(state, f)


def tokenizer_ranks(path):
    """(mergeable ranks {bytes: id}, special tokens {str: id}, pattern) from a tokenizer file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (run `python data.py` to train it)")
    try:
        with open(path) as f:
            state = json.load(f)
        ranks = {bytes([i]): i for i in range(256)}
        for token in state["merged_tokens"]:
            ranks[base64.b64decode(token, validate=True)] = len(ranks)
        specials = {s: len(ranks) + i for i, s in enumerate(state["special_tokens"])}
        pattern = state["pattern"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # empty, cut short, or not ours
        raise ValueError(f"tokenizer file {path} is malformed ({type(e).__name__}: {e}); delete it and run "
                         f"`python data.py` to train it again") from None
    missing = [s for s in SPECIAL_TOKENS if s not in specials]
    if missing:
        raise ValueError(f"tokenizer file {path} lacks the special tokens {missing} (written by an older data.py?); "
                         f"delete it and run `python data.py` again")
    return ranks, specials, pattern


def load_tokenizer(path):
    """The trained tokenizer as a tiktoken.Encoding. Its name carries a hash of the file, which
    checkpoints and token files record, so a mismatched vocabulary is caught at load time."""
    ranks, specials, pattern = tokenizer_ranks(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return tiktoken.Encoding(name=f"bpe-{len(ranks) + len(specials)}-{digest}", pat_str=pattern,
                             mergeable_ranks=ranks, special_tokens=specials)


def bpe_encode(text, ranks, specials, pattern=SPLIT_PATTERN):
    """The reference encoder, slowly, in Python: split out special tokens, pre-split the rest
    with the regex, then in each chunk keep merging the adjacent pair whose merged bytes have
    the lowest rank (the earliest-learned merge), leftmost first, until no pair is a token."""
    ids = []
    special_split = "(" + "|".join(regex.escape(s) for s in specials) + ")"
    for part in regex.split(special_split, text):
        if part in specials:
            ids.append(specials[part])
            continue
        for chunk in regex.findall(pattern, part):
            pieces = [bytes([b]) for b in chunk.encode("utf-8")]
            while len(pieces) > 1:
                rank, i = min((ranks.get(pieces[i] + pieces[i + 1], float("inf")), i) for i in range(len(pieces) - 1))
                if rank == float("inf"):
                    break
                pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
            ids.extend(ranks[p] for p in pieces)
    return ids


# -----------------------------------------------------------------------------
# token files: one flat array per split, read back by np.memmap


def write_tokens(enc, docs, path):
    """Tokenize documents, each followed by EOT, into one flat file; returns (tokens, bytes)."""
    eot = enc.encode_single_token(EOT)
    dtype = np.uint16 if enc.n_vocab < 2**16 else np.uint32
    n_tokens = 0
    with atomic_write(path, "wb") as f:
        for start in range(0, len(docs), 256):
            batch = enc.encode_ordinary_batch(docs[start:start + 256], num_threads=os.cpu_count() or 1)
            for ids in batch:
                np.asarray(ids + [eot], dtype=dtype).tofile(f)
                n_tokens += len(ids) + 1
    return n_tokens, sum(len(d.encode("utf-8")) for d in docs)


def load_tokens(data_dir, split, enc):
    """The memory-mapped tokens of one split, after checking they were made by this tokenizer."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no token files in {data_dir} (run `python data.py` first)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["tokenizer"] != enc.name:
        raise ValueError(f"{data_dir} was tokenized with {meta['tokenizer']}, but the current tokenizer is "
                         f"{enc.name}: run `python data.py` again to re-tokenize it")
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) < 2:
        raise ValueError(f"{data_dir}/{split}.bin holds {len(data)} tokens: the corpus is empty")
    return data


def get_batch(data, batch_size, block_size, generator, device, repeats=None):
    """batch_size random windows of block_size + 1 tokens: inputs and next-token targets. repeats:
    (share, shortest, longest, n_ordinary) to write copy-teaching spans into a share of them
    (insert_repeats)."""
    if len(data) <= block_size:
        raise ValueError(f"only {len(data)} tokens, but a window needs block_size + 1 = {block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    windows = torch.from_numpy(np.stack([data[s:s + block_size + 1].astype(np.int64) for s in starts]))
    if repeats is not None and repeats[0] > 0:
        insert_repeats(windows, *repeats, generator)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


@torch.no_grad()
def window_losses(model, data, n_batches, batch_size, block_size, seed, autocast):
    """The model's loss on each of n_batches batches of windows drawn with a fixed seed: the same windows at
    every call, so that curves from different runs, or a model before and after RL, compare batch by batch."""
    rng, device = torch.Generator().manual_seed(seed), next(model.parameters()).device
    with autocast:
        return [model(*get_batch(data, batch_size, block_size, rng, device))[1].item() for _ in range(n_batches)]


def insert_repeats(windows, share, shortest, longest, n_ordinary, generator):
    """Data that teaches copying, in place: in each window with probability `share`, a span of
    random ordinary tokens, of a random length in [shortest, longest], written at a random place
    and again at a random later one. Nothing but the first copy predicts the second, so the loss
    rewards induction heads (Olsson et al. 2022); random lengths and places leave no positional
    shortcut (a fixed distance is learned at once, and is not copying). Random tokens rather than
    a span of the window's own text: measured, they form induction about ten times sooner."""
    B, W = windows.shape
    for i in range(B):
        if torch.rand(1, generator=generator).item() >= share:
            continue
        n = int(torch.randint(shortest, min(longest, W // 2) + 1, (1,), generator=generator))
        first = int(torch.randint(0, W - 2 * n + 1, (1,), generator=generator))
        second = int(torch.randint(first + n, W - n + 1, (1,), generator=generator))
        windows[i, first:first + n] = torch.randint(n_ordinary, (n,), generator=generator)
        windows[i, second:second + n] = windows[i, first:first + n]


# -----------------------------------------------------------------------------
# the chat format, the same for every stage after pretraining:
#   <|endoftext|> <|user|> request <|assistant|> response <|end|> <|user|> request <|assistant|> ...
# A response is text, or a list of (kind, text) segments: "text" the assistant writes, "call" a tool
# call it writes (<|call|> query <|/call|>), "result" what the tool returned (<|result|> text <|/result|>),
# "work" its working (<|work|> steps <|/work|>).


def encode_response(enc, response):
    """Tokens of one assistant turn, its end token included, and the mask of the tokens the
    assistant writes: 1 on its text, its calls, its working and its end token, 0 on tool results,
    which it only reads (they are never trained on, and never counted as the policy's actions)."""
    segments = [("text", response)] if isinstance(response, str) else response
    special = enc.encode_single_token
    tokens, mask = [], []
    for kind, text in segments:
        if kind == "text":
            piece = enc.encode_ordinary(text)
        elif kind == "call":
            piece = [special(CALL), *enc.encode_ordinary(text), special(CALL_END)]
        elif kind == "result":  # untrusted text: ordinary tokens only, never special ones
            piece = [special(RESULT), *enc.encode_ordinary(text), special(RESULT_END)]
        elif kind == "work":
            piece = [special(WORK), *enc.encode_ordinary(text), special(WORK_END)]
        else:
            raise ValueError(f"unknown response segment kind {kind!r} (text, call, result or work)")
        tokens += piece
        mask += [int(kind != "result")] * len(piece)
    return tokens + [special(END)], mask + [1]


def encode_conversation(enc, turns):
    """Tokens of a conversation, a list of (user request, assistant response) pairs, and the mask
    of the assistant's tokens (every assistant turn is trained on). A last response of None leaves
    the conversation open after <|assistant|>, ready for generation."""
    tokens, mask = [enc.encode_single_token(EOT)], [0]
    for request, response in turns:
        prompt = [enc.encode_single_token(USER), *enc.encode_ordinary(request), enc.encode_single_token(ASSISTANT)]
        tokens += prompt
        mask += [0] * len(prompt)
        if response is not None:
            answer, answer_mask = encode_response(enc, response)
            tokens += answer
            mask += answer_mask
    return tokens, mask


def encode_chat(enc, prompt, response=None):
    """One exchange: tokens and the mask that is 1 exactly on what the assistant writes. Without
    a response: the prompt, ready for generation."""
    return encode_conversation(enc, [(prompt, response)])


def chat_batch(examples, pad_id, device):
    """Right-pad (tokens, mask) pairs into inputs and targets (B, T-1); a target is -1, i.e. not
    trained on, unless the mask marks it as the assistant's. Right padding needs no attention
    mask: causal attention never lets a real token see the padding after it."""
    T = max(len(tokens) for tokens, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (tokens, mask) in enumerate(examples):
        x[i, :len(tokens)] = torch.tensor(tokens)
        y[i, :len(tokens)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(tokens), -1)
    return x[:, :-1].to(device), y[:, 1:].to(device)


SEGMENT_TOKENS = {"call": (CALL, CALL_END), "result": (RESULT, RESULT_END), "work": (WORK, WORK_END)}
SEGMENT = regex.compile("|".join(f"{regex.escape(a)}(.*?){regex.escape(b)}" for a, b in SEGMENT_TOKENS.values()),
                        regex.S)


def segments(text):
    """A response's decoded text back into encode_response's segments: its tool calls, results and
    working, written out with their special tokens, become call, result and work segments again. The
    one parser of segments: tools.parse_calls reads a response's calls through it."""
    parts, out, k = SEGMENT.split(text), [], 1 + len(SEGMENT_TOKENS)  # text, call, result, work, text, ...
    for i in range(0, len(parts), k):
        out += [("text", parts[i])] if parts[i] else []
        out += [(kind, part) for kind, part in zip(SEGMENT_TOKENS, parts[i + 1:i + k]) if part is not None]
    return out


def render_response(segments):
    """Segments as the decoded text of generated tokens: calls, results and working between their
    tokens (the inverse of segments)."""
    wrap = {"text": "{}", **{kind: a + "{}" + b for kind, (a, b) in SEGMENT_TOKENS.items()}}
    return "".join(wrap[kind].format(text) for kind, text in segments)


# -----------------------------------------------------------------------------
# your own data: JSON Lines, a record per line, in the formats of Hugging Face TRL (other fields are ignored)
#   demonstrations (sft.py --demos):      {"prompt": "...", "completion": "..."}, or {"messages": [...]}
#   preference pairs (reward.py --pairs): {"prompt": "...", "chosen": "...", "rejected": "..."}
#   RL prompts (ppo.py --prompts):        {"prompt": "..."}
# A message is {"role": "user" or "assistant", "content": "..."}, the two taking turns, the user first; the
# chat format has no system role, so a first system message's text goes before the first request. A prompt and
# its response may also be two lists of messages, and an RL prompt one list that ends with the user's (TRL's
# conversational form). Each record becomes the (request, response) turns encode_conversation takes, so the
# loss is on every assistant turn. A response is read as the model writes it, a tool call and its result in
# the text: "<|call|>lookup: json.dumps<|/call|><|result|>...<|/result|>" (see segments), as examples/export.py
# writes the world's factual demonstrations; TRL's tool_calls and tool messages are not read. One format per
# file: datasets.load_dataset("json") gives a file one schema, every key on every record (None where absent),
# which TRL cannot train on; sft.py --demos takes several files.


class DataError(ValueError):
    """A file of your own data that cannot be used: says the file, the line and what is wrong."""


def read_jsonl(path):
    """("path:line", record) for each non-blank line of a JSON Lines file."""
    records = []
    with open(path, "rb") as f:  # bytes: json.loads decodes each line, so a bad byte is an error at its line
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # a UnicodeDecodeError is a ValueError too
                raise DataError(f"{path}:{n}: not JSON in UTF-8 ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: a record is a JSON object {{...}}, not {type(record).__name__}")
            records.append((f"{path}:{n}", record))
    if not records:
        raise DataError(f"{path} is empty: no records")
    return records


def read_turns(messages, where, open_end=False):
    """A list of messages as (request, response) turns, each response as segments; with open_end (an RL
    prompt) the user has the last word and the last response is None."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: want a non-empty list of messages")
    n_system = int(isinstance(messages[0], dict) and messages[0].get("role") == "system")  # 0 or 1
    for i, m in enumerate(messages):
        role = "system" if i < n_system else ("user", "assistant")[(i - n_system) % 2]
        if isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")):
            raise DataError(f"{where}: message {i + 1}: tool messages and tool_calls are not read; write the call and "
                            f"its result in the assistant's text, <|call|>lookup: ...<|/call|><|result|>...<|/result|>")
        if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: message {i + 1}: want {{"role": "{role}", "content": "..."}} (user and '
                            f'assistant take turns, after at most one system message); got '
                            f'{json.dumps(m, ensure_ascii=False)[:80]}')
    texts = [m["content"] for m in messages[n_system:]]
    if not texts or len(texts) % 2 != open_end:
        raise DataError(f"{where}: want a {'prompt' if open_end else 'conversation'} that ends with the "
                        f"{'user' if open_end else 'assistant'}'s message")
    if n_system:  # the chat format has no system role: its text goes before the first request
        texts[0] = messages[0]["content"] + "\n\n" + texts[0]
    return list(zip(texts[::2], [segments(t) for t in texts[1::2]] + [None] * open_end))


def conversation(record, key, where):
    """The record's prompt and its response under key (completion, chosen or rejected) as turns."""
    prompt, response = record.get("prompt"), record.get(key)
    if isinstance(prompt, str) and isinstance(response, str):
        return [(prompt, segments(response))]
    if isinstance(prompt, list) and isinstance(response, list):
        return read_turns(prompt + response, where)
    or_messages = '; or "messages", a list of messages' if key == "completion" else ""  # a demonstration's other form
    raise DataError(f'{where}: want "prompt" and "{key}", two strings or two lists of messages{or_messages}; got '
                    f'{json.dumps(record, ensure_ascii=False)[:80]}')


def read_demos(path):
    """Demonstrations for SFT, a conversation each."""
    return [read_turns(r["messages"], where) if "messages" in r else conversation(r, "completion", where)
            for where, r in read_jsonl(path)]


def read_pairs(path):
    """Preference pairs for the reward model: (chosen, rejected) conversations."""
    return [(conversation(r, "chosen", where), conversation(r, "rejected", where)) for where, r in read_jsonl(path)]


def read_prompts(path):
    """Prompts for RL: conversations left open for the policy's answer."""
    out = []
    for where, r in read_jsonl(path):
        if isinstance(r.get("prompt"), str):
            out.append([(r["prompt"], None)])
        elif isinstance(r.get("prompt"), list):
            out.append(read_turns(r["prompt"], where, open_end=True))
        else:
            raise DataError(f'{where}: want "prompt", a string or a list of messages; got '
                            f'{json.dumps(r, ensure_ascii=False)[:80]}')
    return out


def fit_block(items, lengths, block_size, path):
    """The items whose length in tokens fits the model's block. A longer one is skipped and counted, never
    cut: a cut demonstration teaches answers that stop mid-way, a cut pair is judged on half a response."""
    kept = [x for x, n in zip(items, lengths) if n <= block_size]
    if len(kept) < len(items):
        print0(f"{path}: skipped {len(items) - len(kept)} of {len(items)} records: longer than the model's block "
               f"of {block_size} tokens")
    if not kept:
        raise DataError(f"{path}: no record fits the model's block of {block_size} tokens")
    return kept


def split_held_out(items, every=VAL_EVERY):
    """(training items, held-out items): every `every`-th item from the first, a fixed share spread over
    the file, the same on every run."""
    if len(items) < 2:
        raise DataError(f"{len(items)} usable record(s): at least 2 are needed, one to train on, one held out")
    return [x for i, x in enumerate(items) if i % every], items[::every]


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="build the corpora, train the tokenizer, write token files")
    parser.add_argument("--out_dir", default="out", help="writes tokenizer.json and data/{generic,domain}/ here")
    parser.add_argument("--generic_corpus", default=None, help="file or folder of generic text (default: stdlib prose)")
    parser.add_argument("--domain_corpus", default=None, help="file or folder of domain text (default: stdlib source)")
    parser.add_argument("--vocab_size", type=int, default=4096, help="bytes + merges + special tokens")
    parser.add_argument("--max_chars", type=int, default=0, help="use only this many characters of each corpus "
                        "(0: all)")
    parser.add_argument("--corpus", default="stdlib", choices=("stdlib", "installed"), help="the default corpora: the "
                        "standard library, or it and every installed package (the gpu preset's)")
    parser.add_argument("--tokenizer_chars", type=int, default=40_000_000, help="train the tokenizer on at most this "
                        "many characters, half from each corpus's training split (BPE in Python takes time)")
    parser.add_argument("--split_digits", action="store_true", help="pre-split numbers into single digits "
                        "(Galactica, LLaMA) when training the tokenizer")
    parser.add_argument("--block_size", type=int, default=256, help="the longest context you will pretrain with: "
                        "every split must hold at least one window of block_size + 1 tokens")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    t0 = time.time()
    own = args.generic_corpus is not None and args.domain_corpus is not None
    corpora = {} if own else default_corpora(args.corpus == "installed", args.max_chars)
    if args.generic_corpus:
        corpora["generic"] = read_corpus(args.generic_corpus)
    if args.domain_corpus:
        corpora["domain"] = read_corpus(args.domain_corpus)
    if args.max_chars:  # a smaller corpus for quick runs
        for corpus in corpora.values():
            for split, docs in corpus.items():
                corpus[split] = first_chars(docs, args.max_chars if split == "train" else args.max_chars // VAL_EVERY)
    summary = dict(corpora={}, corpus_seconds=round(time.time() - t0, 1))

    tokenizer_path = os.path.join(args.out_dir, "tokenizer.json")
    if not os.path.exists(tokenizer_path):  # the tokenizer sees both training splits, never validation
        t0 = time.time()
        docs = [doc for name in ("generic", "domain")  # half the budget each
                for doc in first_chars(corpora[name]["train"], args.tokenizer_chars // 2) if doc]
        pattern = DIGIT_SPLIT_PATTERN if args.split_digits else SPLIT_PATTERN
        merged = train_bpe(docs, args.vocab_size, pattern)
        save_tokenizer(tokenizer_path, merged, pattern)
        summary["tokenizer_seconds"] = round(time.time() - t0, 1)
        print(f"trained the tokenizer: {256 + len(merged)} byte tokens and merges in {summary['tokenizer_seconds']}s")
    enc = load_tokenizer(tokenizer_path)
    # a tokenizer file kept from an earlier run must have the pre-split asked for
    if tokenizer_ranks(tokenizer_path)[2] != (DIGIT_SPLIT_PATTERN if args.split_digits else SPLIT_PATTERN):
        raise SystemExit(f"{tokenizer_path} has another pre-split than --split_digits asks: delete it, or pass another "
                         "--out_dir")
    summary["tokenizer"] = enc.name

    for name, corpus in corpora.items():
        data_dir = os.path.join(args.out_dir, "data", name)
        os.makedirs(data_dir, exist_ok=True)
        meta = dict(tokenizer=enc.name, dtype="uint16" if enc.n_vocab < 2**16 else "uint32")
        for split, docs in corpus.items():
            n_tokens, n_bytes = write_tokens(enc, docs, os.path.join(data_dir, f"{split}.bin"))
            if n_tokens <= args.block_size:
                raise SystemExit(f"the {name} corpus's {split} split holds {n_tokens} tokens, fewer than one window "
                                 f"of block_size + 1 = {args.block_size + 1}: give it more text (a folder splits by "
                                 f"file, one file in {VAL_EVERY} to validation) or pretrain with a smaller "
                                 "--block_size")
            meta[split] = dict(documents=len(docs), tokens=n_tokens, bytes=n_bytes)
            print(f"{name:>8} {split:>5}: {len(docs):5d} documents | {n_bytes / 1e6:6.2f} MB | "
                  f"{n_tokens:10,d} tokens | {n_bytes / max(n_tokens, 1):.2f} bytes/token")
        write_json(os.path.join(data_dir, "meta.json"), meta)  # written last: it marks the files complete
        summary["corpora"][name] = meta
    write_json(os.path.join(args.out_dir, "data", "summary.json"), summary)
