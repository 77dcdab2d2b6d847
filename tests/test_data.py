import os
import random
import sysconfig

import numpy as np
import pytest
import torch

from data import (ASSISTANT, END, EOT, SPECIAL_TOKENS, USER, bpe_encode, chat_batch, encode_chat, get_batch,
                  load_tokenizer, prose_of, read_corpus, save_tokenizer, tokenizer_ranks, train_bpe, train_bpe_simple)

STDLIB = sysconfig.get_paths()["stdlib"]


def sample_docs():
    """A few real documents: stdlib source and its prose."""
    docs = []
    for name in ("json/decoder.py", "textwrap.py", "string.py", "bisect.py"):
        with open(os.path.join(STDLIB, name)) as f:
            source = f.read()
        docs += [source, prose_of(source)]
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(path, train_bpe(sample_docs(), 600))
    return path


def test_the_readable_trainer_and_the_fast_one_learn_the_same_merges():
    """minbpe's loop as it reads against the heap-and-index trainer: real code and prose; a vocabulary larger
    than the corpus has pairs for (both stop where no pair occurs twice); ties (the smallest pair first)."""
    source = open(os.path.join(STDLIB, "textwrap.py")).read()
    for docs, vocab_size in (([source, prose_of(source)], 400), ([prose_of(source)], 1200), (["ab cd ba dc " * 3], 300)):
        merges = train_bpe(docs, vocab_size)
        assert train_bpe_simple(docs, vocab_size) == merges and len(merges) > 0
    assert train_bpe(["ab cd " * 2], 300)[0] == b" c"  # (a, b), (" ", c) and (c, d) tie: the smallest ids go first


def tricky_texts():
    rng = random.Random(0)
    texts = ["def f(x):\r\n    return x * 3 + 2\r\n", "héllo wörld — naïve café", "日本語のテキスト、中文。",
             "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷", "   leading and trailing   \n\n\n\t\t", "x" * 300, "",
             "It's we'll they'RE 12345678 3.14159", "<|user|> not special when typed? <|end|>"]
    for _ in range(20):  # random bytes read as text, and random code points from all planes
        texts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))).decode("latin-1"))
        texts.append("".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x10FFFF)]))
                             for _ in range(rng.randrange(1, 30))))
    return texts


def test_round_trip_of_arbitrary_text(tokenizer):
    enc = load_tokenizer(tokenizer)
    for text in tricky_texts() + sample_docs():
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_tiktoken_equals_the_reference_encoder(tokenizer):
    enc = load_tokenizer(tokenizer)
    ranks, specials, pattern = tokenizer_ranks(tokenizer)
    for text in tricky_texts() + sample_docs() + [f"{EOT}{USER}make it{ASSISTANT}ok{END}"]:
        assert enc.encode(text, allowed_special="all") == bpe_encode(text, ranks, specials, pattern)


def test_special_tokens_are_single_tokens_after_the_vocabulary(tokenizer):
    enc = load_tokenizer(tokenizer)
    ids = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(enc.n_vocab - len(SPECIAL_TOKENS), enc.n_vocab))
    assert enc.decode(ids) == "".join(SPECIAL_TOKENS)
    assert ids[0] not in enc.encode_ordinary(EOT)  # typed text never becomes a special token


def test_training_is_deterministic_and_compresses():
    a, b = train_bpe(sample_docs(), 400), train_bpe(sample_docs(), 400)
    assert a == b and len(a) == 400 - 256 - len(SPECIAL_TOKENS)
    assert len(set(a)) == len(a)  # every learned token is new bytes


def test_merges_are_the_most_frequent_pairs():
    merged = train_bpe(["aaab " * 50 + "cd " * 10], 256 + len(SPECIAL_TOKENS) + 2)
    assert merged[0] == b"aa"  # twice in each of the 50 'aaab' chunks: the most common pair
    # then (aa, a) and (a, b) tie at 50; ties go to the smaller pair of ids, (97, 98) < (256, 97)
    assert merged[1] == b"ab"


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], 100)


def test_read_corpus_errors_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_corpus(tmp_path / "empty")
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = read_corpus(single)
    assert corpus["train"][0].endswith("line 94\n") and corpus["val"] == ["".join(f"line {i}\n" for i in range(95, 100))]
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i}.txt").write_text(f"document {i}")
    corpus = read_corpus(folder)
    assert len(corpus["train"]) + len(corpus["val"]) == 60 and corpus["val"] and corpus["train"]


def test_prose_takes_docstrings_and_comments_in_order():
    source = '"""Module doc."""\n# a comment\n# continued here\nx = 1  # trailing note\n\ndef f():\n    """Func doc."""\n'
    assert prose_of(source) == "Module doc.\n\na comment continued here trailing note\n\nFunc doc."


def test_chat_mask_marks_exactly_the_assistant_tokens(tokenizer):
    enc = load_tokenizer(tokenizer)
    tokens, mask = encode_chat(enc, "Write f(x).", "def f(x):\n    return x\n")
    start = tokens.index(enc.encode_single_token(ASSISTANT)) + 1
    assert mask == [0] * start + [1] * (len(tokens) - start)
    assert enc.decode(tokens[start:]) == "def f(x):\n    return x\n" + END
    prompt_only, prompt_mask = encode_chat(enc, "Write f(x).")
    assert prompt_only == tokens[:start] and not any(prompt_mask)


def test_chat_batch_pads_right_and_ignores_the_prompt(tokenizer):
    enc = load_tokenizer(tokenizer)
    examples = [encode_chat(enc, "short", "a"), encode_chat(enc, "a longer request here", "bb cc")]
    x, y = chat_batch(examples, pad_id=0, device=torch.device("cpu"))
    for i, (tokens, mask) in enumerate(examples):
        n = len(tokens) - 1
        assert x[i, :n].tolist() == tokens[:-1]
        assert y[i, :n].tolist() == [t if m else -1 for t, m in zip(tokens[1:], mask[1:])]
        assert (y[i, n:] == -1).all()


def test_get_batch_windows_are_shifted_by_one():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 4, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape == (4, 16) and (y - x == 1).all()
    with pytest.raises(ValueError, match="block_size"):
        get_batch(data[:10], 1, 16, torch.Generator(), torch.device("cpu"))


def test_repeats_copy_a_random_span_of_varied_length_to_a_later_place():
    data = np.arange(10_000, dtype=np.uint16) % 300 + 1000  # a corpus with no repeats of its own inside a window
    x, y = get_batch(data, 400, 64, torch.Generator().manual_seed(0), torch.device("cpu"), repeats=(0.5, 4, 20, 900))
    lengths, places = [], set()
    for w in torch.cat([x, y[:, -1:]], dim=1).tolist():
        span = [t for t in w if t < 900]  # the inserted tokens: ordinary ids below 900, written twice
        if span:
            n = len(span) // 2
            assert span[:n] == span[n:] and 4 <= n <= 20
            lengths.append(n)
            places.add(w.index(span[0]))
    assert 0.4 < len(lengths) / 400 < 0.6  # about half the windows
    assert len(set(lengths)) > 10 and len(places) > 20  # many lengths, many places: no positional shortcut
