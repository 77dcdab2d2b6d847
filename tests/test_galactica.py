"""Galactica's data lessons: the curation rule, digits as tokens, the share of prompts mixed into pretraining."""
import numpy as np
import pytest
import regex

from data import DIGIT_SPLIT_PATTERN, SPLIT_PATTERN, load_tokenizer, save_tokenizer, train_bpe
from galactica import curate, mix

SOURCE = '''
def documented(x):
    """Twice x."""
    return 2 * x


def bare(x):
    return x


class A:
    def documented(x):
        """Twice x."""
        return 2 * x

    async def fetch(self):
        """Nothing yet."""
        return None
'''


def test_curation_keeps_each_documented_function_once():
    """Documented functions and methods, dedented; the undocumented one dropped; the method that repeats a
    function (indented, in another file too) kept once; a file that does not parse skipped."""
    kept = curate([("a.py", SOURCE), ("b.py", SOURCE), ("broken.py", "def (")])
    assert [text.split("(")[0] for text in kept] == ["def documented", "async def fetch"]
    assert kept[0] == 'def documented(x):\n    """Twice x."""\n    return 2 * x'


def test_digits_are_single_tokens_and_round_trip(tmp_path):
    """With --split_digits no token holds two digits, even where the corpus repeats a number; without it the
    same corpus merges them (GPT-4's pre-split keeps up to 3 digits together)."""
    text = "x = 12345 + 678 * 90\n" * 50
    assert regex.findall(DIGIT_SPLIT_PATTERN, "12345") == list("12345")
    assert regex.findall(SPLIT_PATTERN, "12345") == ["123", "45"]
    for pattern, merged_digits in ((DIGIT_SPLIT_PATTERN, False), (SPLIT_PATTERN, True)):
        path = tmp_path / "tokenizer.json"
        save_tokenizer(path, train_bpe([text], 300, pattern), pattern)
        enc = load_tokenizer(path)
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text
        pieces = [enc.decode([i]) for i in enc.encode_ordinary("12345 + 678")]
        assert any(sum(c.isdigit() for c in p) > 1 for p in pieces) == merged_digits, pieces


def test_prompt_mix_share():
    """Prompt tokens appended until they are the share asked of the whole, the last document cut there."""
    domain = np.arange(1000, dtype=np.uint16)
    tokens, n_prompt = mix(domain, [[7] * 30] * 10, 0.03)
    assert n_prompt == 31 and len(tokens) == 1031 and tokens.dtype == np.uint16
    assert (tokens[:1000] == domain).all() and (tokens[1000:] == 7).all()
    assert abs(n_prompt / len(tokens) - 0.03) < 1e-3
    with pytest.raises(ValueError, match="fewer than"):
        mix(domain, [[7] * 30], 0.03)


def test_the_report_section_is_empty_without_its_stages(tmp_path):
    from report import report_galactica
    assert report_galactica(str(tmp_path), {}) == []
