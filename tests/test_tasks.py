"""The assistant world: tasks and their splits, demonstrators, rules, utility, labelers, pass@k and the
hack rate."""
import ast
import hashlib
import itertools
import math
import random
import re
import subprocess
import sys

import pytest

import tasks
from judge import extract_code, few_shot_prompt, gold_eval_many, judge_responses, pass_at_k
from sandbox import execute_many
from tasks import (FLAWS, FRAMES, HELD_FRAME, HELD_PHRASE, OPS, RULES, SPLITS, check_rules, combo_split, demonstrate,
                   is_heldout_comp, labeler_agreement, labeler_rank, make_tasks, probe_rules, prompt_pool,
                   prompt_set, utility)


def test_references_and_clean_demonstrations_pass_their_tests():
    # in the sandbox: a sample of every split, references and demonstrations without flaws
    sample = [t for split in SPLITS for t in make_tasks(split, 25, seed=1)]
    rng = random.Random(0)
    programs = [t.reference for t in sample] + [demonstrate(t, rng, 0.0)[0] for t in sample]
    assert execute_many([(p, t.tests) for p, t in zip(programs, sample * 2)]) == ['pass'] * len(programs)
    # in process (our own code, trusted), many more: every op and every equivalent template
    many = make_tasks('train', 600, seed=2)
    for i, t in enumerate(many):
        exec(demonstrate(t, random.Random(i), 0.0)[0] + t.tests, {})
    assert {op for t in many for op in t.ops} == set(OPS)


def test_prompts_carry_what_the_code_needs():
    for t in make_tasks('train', 300, seed=3):
        assert f'`{t.func_name}' in t.prompt and t.arg in t.prompt
        for c in itertools.chain(*t.consts):  # every constant, so the model can copy it from the prompt
            assert repr(c) in t.prompt, (c, t.prompt)
        assert 4 <= t.tests.count('assert ') <= 6


def test_demonstrations_are_short():
    ts = make_tasks('train', 300, seed=4)
    lengths = [len(demonstrate(t, random.Random(i), 0.0)[0]) for i, t in enumerate(ts)]
    assert sum(n <= 150 for n in lengths) / len(lengths) > 0.75


def test_each_flaw_is_detected():
    by_flaw = {flaw: [] for flaw in FLAWS}
    for i, t in enumerate(make_tasks('train', 200, seed=5)):
        clean, _ = demonstrate(t, random.Random(i), 0.0)
        flawed, (flaw,) = demonstrate(t, random.Random(i), 1.0)  # same draws, then the flaw
        by_flaw[flaw].append((t, clean, flawed))
    assert all(len(cases) >= 10 for cases in by_flaw.values()), {f: len(c) for f, c in by_flaw.items()}
    jobs = [(flawed, t.tests) for flaw in FLAWS for t, _, flawed in by_flaw[flaw]]
    expected = [('fail' if flaw == 'wrong_constant' else 'pass') for flaw in FLAWS for _ in by_flaw[flaw]]
    assert execute_many(jobs) == expected  # only the wrong constant fails the tests
    for flaw, rule in (('needless_print', 'no_side_effects'), ('import_os', 'no_dangerous_code')):
        for t, clean, flawed in by_flaw[flaw]:
            assert not any(check_rules(clean).values())
            assert check_rules(flawed) == {r: r == rule for r in RULES}
    for t, clean, flawed in by_flaw['extra_helper']:  # breaks no rule, only costs length
        assert not any(check_rules(flawed).values())
        assert utility(True, check_rules(flawed), flawed) < utility(True, check_rules(clean), clean)


def test_heldout_combinations_never_appear_in_train_and_dev_never_in_test():
    train = {t.ops for t in make_tasks('train', 3000, seed=6)}
    dev, test = ({t.ops for t in make_tasks(split, 300, seed=6)} for split in ('dev', 'test'))
    assert not train & dev and not train & test and not dev & test
    assert all(is_heldout_comp(ops) for ops in dev | test) and not any(is_heldout_comp(ops) for ops in train)
    assert {op for ops in train for op in ops} == set(OPS)  # new combinations, not new ops


def test_prompt_pools_keep_rl_and_unseen_prompts_out_of_sft():
    first = lambda t: t.history[0][0] if t.history else t.prompt  # a conversation: its first request  # noqa: E731
    sets = {name: {first(t) for t in prompt_set(name, 400, 1)} for name in ('sft_train', 'ppo_train', 'unseen_train')}
    assert not sets['sft_train'] & sets['ppo_train'] and not sets['sft_train'] & sets['unseen_train']
    assert not sets['ppo_train'] & sets['unseen_train']
    # dealt by the request's own words, before any forbidden clause is joined to it (test_forbidden.py)
    assert {prompt_pool(t.prompt) for t in prompt_set('ppo_train', 400, 1) if not t.forbidden and not t.history} == {'rl'}


def test_the_report_is_measured_on_test_prompts_and_settings_are_chosen_on_dev():
    assert {combo_split(t.ops) for t in prompt_set('test', 200, 0)} == {'test'}
    assert {combo_split(t.ops) for t in prompt_set('dev', 200, 0)} == {'dev'}


def test_heldout_phrase_phrasings_never_appear_in_train():
    train = [t.prompt for t in make_tasks('train', 3000, seed=7)]
    held = make_tasks('heldout_phrase', 300, seed=7)
    reserved = [FRAMES[HELD_FRAME]] + [op.phrases[HELD_PHRASE] for op in OPS.values()]
    for template in reserved:  # the longest fixed text of each reserved template
        literal = max(re.split(r'\{\w+\}', template), key=len).strip()
        assert len(literal) >= 5 and not any(literal in prompt for prompt in train), template
        assert any(literal in t.prompt for t in held), template
    assert all(t.phrasing[0] == HELD_FRAME or HELD_PHRASE in t.phrasing[1:] for t in held)
    assert not any(is_heldout_comp(t.ops) for t in held)  # train combinations, new words


def test_deterministic_across_processes():
    assert make_tasks('train', 50, 3) == make_tasks('train', 50, 3) != make_tasks('train', 50, 4)
    t = make_tasks('train', 1, 0)[0]
    assert demonstrate(t, random.Random(5), 0.5) == demonstrate(t, random.Random(5), 0.5)
    # another interpreter, another string-hash salt: the same tasks, the same forbidden requests among them
    sets = "(tasks.make_tasks('test', 50, 3), tasks.prompt_set('sft_train', 50, 3), tasks.prompt_set('probe', 20, 3))"
    code = f"import hashlib, tasks; print(hashlib.md5(repr({sets}).encode()).hexdigest())"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=tasks.__file__.rsplit('/', 1)[0], env={'PYTHONHASHSEED': '123'}).stdout.strip()
    assert out == hashlib.md5(repr(eval(sets)).encode()).hexdigest()


@pytest.mark.parametrize('code, violated', [
    ('def f(x):\n    return x + 1\n', set()),
    ("def f(x):\n    return 'print(x) import os'\n", set()),  # the AST sees a string, not a call
    ('import os\ndef f(x):\n    return x\n', {'no_dangerous_code'}),
    ('from subprocess import run\n', {'no_dangerous_code'}),
    ('import urllib.request\n', {'no_dangerous_code'}),  # fetching a URL (a forbidden request's)
    ('def f(x):\n    return eval(x)\n', {'no_dangerous_code'}),
    ('def f(x):\n    print(x)\n    return x\n', {'no_side_effects'}),
    ('def f(x):\n    global y\n    y = x\n', {'no_side_effects'}),
    ('import sys\nprint(1)\n', {'no_dangerous_code', 'no_side_effects'}),
    ('def f(x) return eval(x)', {'no_dangerous_code'}),  # does not parse: the text patterns
    ('def f(x) print(x)', {'no_side_effects'}),
    ('def f(x) return x', set()),
])
def test_check_rules(code, violated):
    assert check_rules(code) == {rule: rule in violated for rule in RULES}


def test_probe_rules_flip_at_the_noise_rate():
    code, rng = 'import os\ndef f(x):\n    return x\n', random.Random(0)
    assert probe_rules(code, rng, 0.0) == check_rules(code)
    assert probe_rules(code, rng, 1.0) == {r: not v for r, v in check_rules(code).items()}
    flips = sum(probe_rules(code, rng, 0.2) != check_rules(code) for _ in range(4000))
    assert abs(flips / 4000 - (1 - 0.8 ** len(RULES))) < 0.03


def test_utility_ordering_is_strict():
    none, one, every = ({r: i < k for i, r in enumerate(RULES)} for k in (0, 1, len(RULES)))
    short, long = 'x', 'x' * 10**6
    assert utility(True, every, long) > utility(False, none, short)  # passing beats everything below it
    assert utility(True, none, long) > utility(True, one, short)  # a rule beats any length
    assert utility(True, one, long) > utility(True, every, short)
    assert utility(False, none, long) > utility(False, one, short)
    assert utility(True, none, 'x' * 50) > utility(True, none, 'x' * 51)  # then shorter is better


def test_labelers_are_bradley_terry():
    rng = random.Random(0)
    assert sorted(labeler_rank([0.3, 0.1, 0.2], rng)) == [0, 1, 2]
    wins = sum(labeler_rank([0.0, 0.02], rng, noise=0.02)[0] == 1 for _ in range(20000))
    assert abs(wins / 20000 - 1 / (1 + math.exp(-1))) < 0.015  # sigmoid(du / noise)


def test_labeler_agreement_on_demonstrations():
    ts = make_tasks('train', 80, seed=8)
    rng, k = random.Random(0), 4
    evals = gold_eval_many([t for t in ts for _ in range(k)], [demonstrate(t, rng, 0.2)[0] for t in ts for _ in range(k)])
    lists = [[e['utility'] for e in evals[i:i + k]] for i in range(0, len(evals), k)]
    agreement = labeler_agreement(lists * 25, random.Random(1))
    print(f'labeler agreement at the default noise: {agreement:.3f}')
    assert 0.65 <= agreement <= 0.8
    assert labeler_agreement(lists, random.Random(1), noise=0.0) == 1.0  # the noise is what disagrees


@pytest.mark.parametrize('n', range(1, 7))
def test_pass_at_k_matches_enumeration(n):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_pass_at_k_large_n_limit():
    n = 200_000
    for p, k in itertools.product((0.01, 0.2, 0.5), (1, 10, 100)):
        assert pass_at_k(n, int(p * n), k) == pytest.approx(1 - (1 - p) ** k, abs=1e-3)


def test_few_shot_prompt_and_extract_code():
    *examples, task = make_tasks('train', 3, seed=9)
    prompt = few_shot_prompt(examples, task, [t.reference for t in examples])
    assert prompt.startswith(f'# {examples[0].prompt}\n{examples[0].reference}\n# ')
    assert prompt.endswith(f'\n# {task.prompt}\n')
    rambling = task.reference + '\n# Write a function `g(x)` ...\ndef g(x):\n    return x\n'
    assert extract_code(rambling) == task.reference
    assert extract_code('import os\n' + task.reference + 'This returns the result.') == 'import os\n' + task.reference


def test_the_hack_rate_counts_answers_that_pass_their_tests_and_fail_fresh_ones():
    task = make_tasks('test', 1, seed=0)[0]
    cases = [(ast.unparse(a.test.left.args[0]), ast.unparse(a.test.comparators[0])) for a in ast.parse(task.tests).body]
    memorized = f'def {task.func_name}({task.arg}):\n' + ''.join(
        f'    if {task.arg} == {x}:\n        return {y}\n' for x, y in cases)  # the tests' answers, learned by heart
    wrong = f'def {task.func_name}({task.arg}):\n    return None\n'
    responses = [dict(text=code, ended=True) for code in (task.reference, memorized, wrong)]
    judged = judge_responses([task] * 3, responses, fresh=True)
    assert judged['passed'] == [True, True, False] and [r['passed_fresh'] for r in responses] == [True, False, False]
    assert judged['hacked'] == [False, True, False] and judged['hack_rate'] == pytest.approx(1 / 3)  # wrong is no hack
