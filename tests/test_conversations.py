"""Conversations: the training share and its follow-up kinds, the held-out follow-ups, what SFT trains on in a
conversation, the reported failure's facts, and probes split over two turns."""
import ast
import random
from collections import Counter

from data import encode_conversation
from judge import followup_line, judge_responses
from sandbox import execute_many
from tasks import (ADMIT_RE, FOLLOW_UPS, MAX_CONTEXT_CHARS, SPLIT_PROBE, TRAIN_FOLLOW_UPS, WRAPS, combo_split,
                   demonstrate, encode_task, prompt_set)


def test_training_sets_hold_conversations_of_the_trained_kinds_and_followup_holds_the_rest():
    train = [t for name in ('sft_train', 'reward_train', 'ppo_train') for t in prompt_set(name, 400, 1)]
    kinds = Counter(t.follow_up[0] for t in train if t.history)
    assert set(kinds) == set(TRAIN_FOLLOW_UPS) and 0.1 < sum(kinds.values()) / len(train) < 0.3
    assert any(len(t.history) == 2 for t in train)  # some run three turns
    held = prompt_set('followup', 80, 1)
    assert Counter(t.follow_up[0] for t in held) == {k: 20 for k in FOLLOW_UPS}  # 'map': never in training
    assert all(combo_split(t.ops) == 'test' for t in held if t.follow_up == ('extend',))
    assert all(combo_split(t.ops) == 'train' for t in train if t.follow_up == ('extend',))
    assert prompt_set('followup', 40, 1) == held[:40]  # the first n do not depend on n (chat.py's /task)
    for t in train + held:
        assert sum(len(q) + len(a) for q, a in t.history) + len(t.prompt) <= MAX_CONTEXT_CHARS


def test_each_turn_is_judged_on_the_function_it_asks_for():
    held = prompt_set('followup', 40, 1)
    train = [t for t in prompt_set('sft_train', 300, 1) if t.history][:40]
    # the reference and a demonstration pass; the earlier turn's answer, renamed away or one step short, fails
    demos = [demonstrate(t, random.Random(i), 0.0)[0] for i, t in enumerate(train)]
    assert execute_many([(t.reference, t.tests) for t in held + train]) == ['pass'] * 80
    assert execute_many([(code, t.tests) for code, t in zip(demos, train)]) == ['pass'] * 40
    changed = [t for t in held + train if t.follow_up[0] in ('rename', 'extend', 'map')]
    assert all(r != 'pass' for r in execute_many([(t.history[-1][1], t.tests) for t in changed]))


def test_a_reported_failure_is_true_and_its_fix_owns_up_in_a_sentence():
    fixes = [t for t in prompt_set('followup', 80, 1) if t.follow_up[0] == 'fix']
    for t in fixes:
        wrong, ns_wrong, ns_right = t.history[-1][1], {}, {}
        exec(wrong, ns_wrong)  # our own generated code, trusted
        exec(t.reference, ns_right)
        call = t.prompt.split('`')[1]  # "`f(3)` returned 9; it should be 11."
        x = ast.literal_eval(call[len(t.func_name) + 1:-1])
        assert repr(ns_wrong[t.func_name](x)) in t.prompt and repr(ns_right[t.func_name](x)) in t.prompt
        assert f'{t.func_name}({x!r})' == call and ns_wrong[t.func_name](x) != ns_right[t.func_name](x)
        code = demonstrate(t, random.Random(0), 0.0)[0]
        assert ADMIT_RE.match(code) and str(t.follow_up[1]) in code.split('\n')[0] and not ADMIT_RE.match(wrong)
    verdicts = judge_responses(fixes, [dict(text=demonstrate(t, random.Random(0), 0.0)[0], ended=True) for t in fixes])
    assert verdicts['pass1'] == 1.0


def test_sft_trains_on_every_assistant_turn_but_a_planted_mistake(enc):
    train = [t for t in prompt_set('sft_train', 400, 1) if t.history]
    for t in [next(t for t in train if t.follow_up[0] == k) for k in TRAIN_FOLLOW_UPS]:
        answer = demonstrate(t, random.Random(0), 0.0)[0]
        tokens, mask = encode_task(enc, t, answer)
        plain_tokens, plain_mask = encode_conversation(enc, [*t.history, (t.prompt, answer)])
        assert tokens == plain_tokens
        wrong = set(range(len(encode_conversation(enc, t.history[:-1])[0]), len(encode_conversation(enc, t.history)[0])))
        for i, (m, p) in enumerate(zip(mask, plain_mask)):
            assert m == (0 if t.follow_up[0] == 'fix' and i in wrong else p)
        trained_before = sum(mask[:len(encode_conversation(enc, t.history)[0])])
        assert (trained_before == 0) == (t.follow_up[0] == 'fix' and len(t.history) == 1)


def test_split_probes_ask_the_forbidden_part_alone_in_a_second_turn():
    probe = prompt_set('probe', 60, 1)
    split = [t for t in probe if t.history]
    assert 5 < len(split) <= 20 and all(t.forbidden[3] == len(WRAPS) for t in split)
    prefix = SPLIT_PROBE.split('{')[0]
    assert all(t.prompt.startswith(prefix) and t.history[0][0] not in t.prompt for t in split)
    train = [t for name in ('sft_train', 'reward_train', 'ppo_train') for t in prompt_set(name, 400, 1)]
    assert not any(t.prompt.startswith(prefix) for t in train)
    # the allowed part: the same function as the first turn, judged by the same tests
    assert execute_many([(t.history[0][1], t.tests) for t in split]) == ['pass'] * len(split)


def test_followup_line_reports_the_fix_rate_from_the_fix_kind():
    f = dict(kinds=['rename', 'fix', 'fix', 'map'], passed=[True, True, False, False], admitted=[False, True, True, False],
             pass1={'rename': 1.0, 'extend': 0.0, 'fix': 0.5, 'map': 0.0})
    assert 'owned up 100.0%, fixed 50.0%' in followup_line(f)
