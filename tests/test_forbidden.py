"""Requests the rules forbid: the training share, the held-out probes, the demonstrators' declining, the
utility's order, and the adversarial-probing measures (Sparrow)."""
import random
import re

import pytest

from judge import gold_eval_many, judge_responses, probing_rates
from sandbox import execute_many
from tasks import (COMPLY, DECLINE, FORBIDDEN, HELD_FORBID, HELD_WRAP, PROMPT_SETS, RULES, WRAPS, check_rules,
                   declines, demonstrate, make_tasks, prompt_set)

TRAINING_SETS = [name for name, (*_, forbidden) in PROMPT_SETS.items() if forbidden == 'share']


def forbidden_training_requests(n=600):
    return [t for name in TRAINING_SETS for t in prompt_set(name, n, 1) if t.forbidden]


def test_a_share_of_the_training_sets_asks_for_what_the_rules_forbid_and_nothing_else_changes():
    assert TRAINING_SETS == ['sft_train', 'reward_train', 'ppo_train']
    for name, (split, offset, pool, forbidden) in PROMPT_SETS.items():
        if forbidden == 'followup':  # conversations: tests/test_conversations.py
            continue
        tasks, plain = prompt_set(name, 200, 1), make_tasks(split, 200, 1 + offset, pool)  # (deterministic: test_tasks)
        share = sum(bool(t.forbidden) or bool(t.history and t.history[0][0] != p.prompt) for t, p in zip(tasks, plain))
        assert {'share': 10 < share < 30, 'probe': share == 200, None: share == 0}[forbidden], (name, share)
        for t, p in zip(tasks, plain):  # the same function and tests; only a forbidden request's words differ
            if t.follow_up:  # a conversation's later turn asks for another function
                continue
            first = t.history[0][0] if t.history else t.prompt  # a probe split over two turns: the request first
            assert (first == p.prompt) != (bool(t.forbidden) and not t.history) and (t.tests, t.reference) == (
                p.tests, p.reference)
            assert not t.forbidden or p.prompt in first
    probe = prompt_set('probe', 300, 1)
    assert {t.forbidden[0] for t in probe} == set(FORBIDDEN)
    assert all(t.forbidden[2] >= HELD_FORBID and t.forbidden[3] >= HELD_WRAP for t in probe)


def test_probe_prompts_share_no_wrapping_or_phrasing_with_training_ones():
    train, probe = [t.prompt for t in forbidden_training_requests()], [t.prompt for t in prompt_set('probe', 300, 1)]
    assert len(train) > 100 and all(t.forbidden[2] < HELD_FORBID and t.forbidden[3] < HELD_WRAP
                                    for t in forbidden_training_requests())
    reserved = list(WRAPS[HELD_WRAP:]) + [p for f in FORBIDDEN.values() for p in f.phrases[HELD_FORBID:]]
    for template in reserved:  # every fixed piece of each reserved template
        for literal in (s.strip() for s in re.split(r'\{\w+\}', template) if len(s.strip()) >= 4):
            assert not any(literal in prompt for prompt in train), (template, literal)
        longest = max(re.split(r'\{\w+\}', template), key=len).strip()
        assert any(longest in prompt for prompt in probe), template


def test_demonstrations_decline_in_a_comment_pass_and_break_no_rule_and_compliance_breaks_one():
    by_kind = {}
    for t in forbidden_training_requests(300) + prompt_set('probe', 30, 1):
        by_kind.setdefault(t.forbidden[0], []).append(t)
    sample = [t for kind in FORBIDDEN for t in by_kind[kind][:4]]
    declined = [demonstrate(t, random.Random(i), 0.0) for i, t in enumerate(sample)]
    complied = [demonstrate(t, random.Random(i), 1.0) for i, t in enumerate(sample)]
    for t, (code, flaws) in zip(sample, declined):
        first = code.split('\n', 1)[0] + '\n'
        assert flaws == () and declines(code) and first == DECLINE.format(FORBIDDEN[t.forbidden[0]].declined)
        assert code.split('\n', 1)[1].startswith(f'def {t.func_name}(') and not any(check_rules(code).values())
    for code, flaws in complied:
        assert flaws == (COMPLY,) and not declines(code) and check_rules(code)['no_dangerous_code']
    # the hidden tests judge the allowed part: both pass (the tests never call the compliant helper)
    assert execute_many([(code, t.tests) for (code, _), t in zip(declined + complied, sample * 2)]) == \
        ['pass'] * 2 * len(sample)


@pytest.mark.parametrize('kind', sorted(FORBIDDEN))
def test_each_compliant_helper_breaks_a_rule(kind):
    for obj in FORBIDDEN[kind].objects:
        assert check_rules(FORBIDDEN[kind].helper.format(o=repr(obj))) == {r: r == 'no_dangerous_code' for r in RULES}


def answers(task):
    """Hand-written answers to a request: declining its forbidden part, silent about it, complying, refusing all."""
    code = task.reference
    helper = FORBIDDEN[task.forbidden[0]].helper.format(o=repr(task.forbidden[1])) if task.forbidden else ''
    decline = DECLINE.format('do that')
    return dict(decline=decline + code, silent=code, comply=f'{code}\n\n{helper}', refuse=decline)


def test_the_utility_ranks_declining_over_complying_over_refusing_everything():
    tasks = [t for t in forbidden_training_requests(300) if t.forbidden[0] in ('delete', 'write', 'shell')][:3]
    tasks += prompt_set('probe', 2, 1)
    kinds = ('decline', 'silent', 'comply', 'refuse')
    evals = gold_eval_many([t for t in tasks for _ in kinds], [answers(t)[k] for t in tasks for k in kinds])
    for i in range(len(tasks)):
        u = [e['utility'] for e in evals[i * len(kinds):(i + 1) * len(kinds)]]
        assert u == sorted(u, reverse=True) and len(set(u)) == len(u), dict(zip(kinds, u))  # in kinds' order
    plain = make_tasks('train', 1, 0)[0]  # an ordinary request: declining it is over-refusal, and costs
    over, right = gold_eval_many([plain] * 2, [answers(plain)['decline'], plain.reference])
    assert over['passed'] and right['utility'] > over['utility'] + 0.1


def test_probing_rates_count_violations_declines_and_over_refusals():
    forbidden, plain = prompt_set('probe', 1, 2)[0], make_tasks('test', 1, 2)[0]
    probe = [answers(forbidden)[k] for k in ('decline', 'comply', 'silent', 'refuse')]
    ordinary = [answers(plain)[k] for k in ('silent', 'decline', 'silent')]
    judged = [judge_responses([t] * len(texts), [dict(text=x, ended=True) for x in texts])
              for t, texts in ((forbidden, probe), (plain, ordinary))]
    rates = probing_rates(*judged)
    assert rates['violated'] == [False, True, False, False] and rates['declined'] == [True, False, False, True]
    assert rates['passed'] == [True, True, True, False] and rates['over_refused'] == [False, True, False]
    assert (rates['violation_rate'], rates['decline_rate'], rates['pass1']) == (0.25, 0.5, 0.75)
    assert rates['over_refusal_rate'] == pytest.approx(1 / 3)
