"""Galactica's lessons: the curation rule, digits as tokens, the share of prompts mixed into pretraining, and
working memory (the working's steps, its tokens, the three roads to an arithmetic answer)."""
import random
import re

import numpy as np
import pytest
import regex
import torch

from data import (CALL, CALL_END, DIGIT_SPLIT_PATTERN, END, SPLIT_PATTERN, WORK, WORK_END, encode_chat, load_tokenizer,
                  render_response, save_tokenizer, segments, train_bpe)
from galactica import (ARITHMETIC, ROADS, answer_by_road, arithmetic_sets, curate, demonstrate_arithmetic, mix,
                       work_out)
from model import Generation
from tools import Question, _arithmetic_question, build_index, calculate, judge_fact, parse_calls

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


def test_working_states_true_steps_digit_by_digit():
    """Every step of the working is true arithmetic on the numbers' own digits, column by column with the
    carry, and the working ends on the calculator's value."""
    rng = random.Random(0)
    for _ in range(300):
        kind = rng.choice(ARITHMETIC)
        q = _arithmetic_question(kind, rng)
        work = work_out(q.subject)
        assert work.endswith(f"so {calculate(q.subject)}"), work
        columns = [step for step in re.findall(r"[\d+]+=\d+", work.split(";")[-1])]
        addends = [int(n) for n in (work.split(";")[-1].split(":")[0] if kind == "product" else q.subject).split("+")]
        carry = 0
        for i, step in enumerate(columns):
            digits, total = step.split("=")
            digits = [int(d) for d in digits.split("+")]
            assert digits == [n // 10 ** i % 10 for n in addends] + ([carry] if carry else []), (work, i)
            assert sum(digits) == int(total)
            carry = int(total) // 10
        if kind == "product":
            a, b = (int(n) for n in q.subject.split("*"))
            for x, y, z in re.findall(r"(\d+)\*(\d+)=(\d+)", work):
                assert int(x) == a and int(x) * int(y) == int(z)
            assert sum(addends) == a * b


def test_work_segments_are_the_assistants_and_not_its_answer(enc):
    """<|work|> ... <|/work|> is trained on (mask 1), decodes back into the same segments, and the judge
    reads the claim after it, never a number inside it."""
    response = [("work", "1+2=3, so 3"), ("text", '`1 + 2` is `3`: "3"')]
    tokens, mask = encode_chat(enc, "What is 1 + 2?", response)
    start = tokens.index(enc.encode_single_token(WORK))
    assert tokens[start:].count(enc.encode_single_token(WORK_END)) == 1 and all(mask[start:])
    decoded = enc.decode(tokens[start:-1])
    assert segments(decoded) == response and render_response(response) == decoded
    q = Question("What is 1 + 2?", "3", "sum", None, "1 + 2", "3", "calc: 1 + 2")
    assert judge_fact(None, q, decoded)["right"]
    assert not judge_fact(None, q, render_response([("work", '`1 + 2` is `3`'), ("text", '`1 + 2` is `4`: "4"')]))["right"]


def test_arithmetic_roads_are_demonstrated_right_and_held_out_numbers_unseen():
    index = build_index([("m.py", 'def f(x=1):\n    """Does f."""\n')])
    train, held_out = arithmetic_sets(index, 600, 100, seed=0)
    assert len(held_out) == 100 and not {q.subject for q in train} & {q.subject for q in held_out}
    assert {q.kind for q in train} == set(ARITHMETIC)
    for i, q in enumerate(train[:30]):
        road = ROADS[i % len(ROADS)]
        response = demonstrate_arithmetic(index, q, road)
        assert [kind for kind, _ in response][0] == {"calc": "call", "work": "work", "direct": "text"}[road]
        assert judge_fact(index, q, response)["right"]


class ScriptedModel:
    """A stand-in for a chat model with generate()'s interface: after <|call|> it writes a calculator call,
    anywhere else the answer `7`; what answer_by_road forces around it is what is tested."""
    config = type("Config", (), {"block_size": 256})

    def __init__(self, enc):
        self.enc = enc

    def eval(self):
        return self

    def generate(self, prompts, max_new_tokens, temperature, eos_id=None, pad_id=0, generator=None, tool_runner=None):
        special = self.enc.encode_single_token
        rows = [self.enc.encode_ordinary("calc: 3 + 4") + [special(CALL_END)] if p[-1] == special(CALL)
                else self.enc.encode_ordinary('7`: "7"') + [special(END)] for p in prompts]
        width = max(map(len, rows))
        pad = lambda row: row + [pad_id] * (width - len(row))  # noqa: E731
        return Generation(torch.tensor([pad(r) for r in rows]), torch.zeros(len(rows), width),
                          torch.tensor([len(r) for r in rows]), torch.zeros(len(rows), width, dtype=torch.bool))


def test_each_road_is_forced_from_the_first_token(enc):
    index = build_index([("m.py", 'def f(x=1):\n    """Does f."""\n')])
    q = Question("What is 3 + 4?", "7", "sum", None, "3 + 4", "7", "calc: 3 + 4")
    direct, work, calc = (answer_by_road(ScriptedModel(enc), enc, index, [q], road)[0]
                          for road in ("direct", "work", "calc"))
    assert direct == '`3 + 4` is `7`: "7"'
    assert work.startswith(WORK)
    calls, answer = parse_calls(calc)
    assert calls == [("calc: 3 + 4", "7")] and answer == '7`: "7"'  # the calculator's result, read in
    assert judge_fact(index, q, direct)["right"]


def test_the_working_memory_verdicts_come_from_the_roads(tmp_path):
    """The report's working-memory rows: each road's accuracy by kind, and a verdict per comparison that
    holds only where the interval clears zero (work right on every sum, direct on none)."""
    import json
    from report import report_galactica
    kinds = ["sum", "product"] * 50
    runs = {"galactica_arithmetic": dict(direct=[False] * 100, work=[k == "sum" for k in kinds], calc=[True] * 100),
            "galactica_digits_arithmetic": dict(direct=[False] * 100, work=[True] * 100, calc=[True] * 100)}
    (tmp_path / "galactica_data").mkdir()
    (tmp_path / "galactica_data" / "summary.json").write_text(json.dumps(dict(arithmetic=dict(
        demonstrations=900, held_out=100))))
    for name, run in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text(json.dumps(dict(step=600, val_loss=0.5)) + "\n")
        (tmp_path / f"{name}_eval").mkdir()
        (tmp_path / f"{name}_eval" / "summary.json").write_text(json.dumps(dict(run, kinds=kinds)))
    lines = "\n".join(report_galactica(str(tmp_path), {}))
    assert "| GPT-4's pre-split | 0.0 [0.0, 0.0]% | 0.0 [0.0, 0.0]% | 100.0 [100.0, 100.0]% | 0.0 [0.0, 0.0]% |" in lines
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines.splitlines()]
    verdicts = {cells[0]: cells[2] for cells in rows if len(cells) == 3}
    assert verdicts["working in `<work>` beats the direct answer (GPT-4's pre-split)"] == "holds"
    assert verdicts["the calculator beats working in `<work>` (digits split)"] == "not shown at this size"
    assert verdicts["digit tokens help arithmetic (work)"] == "holds"
    assert verdicts["digit tokens help arithmetic (calc)"] == "not shown at this size"
