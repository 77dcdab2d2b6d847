"""The gold judge, and judging a policy with it: the same measures in every stage and the report.

The judge runs an answer against its request's hidden tests in the sandbox (sandbox.py), checks the rules and
scores the utility the simulated labelers rank by (tasks.py); pass@k is Codex's unbiased estimator. Judging a
policy samples its answers with the KV cache (greedy, or n samples at a temperature: the distribution RL
optimizes), reranks by mean log-probability (Codex) or by the reward models (best-of-n: Sparrow, LaMDA), prompts
a base model few-shot, probes it adversarially (Sparrow) and follows up its conversations (ChatGPT).
"""
import ast
import math
import random
from statistics import fmean

import torch

from data import END, EOT
from sandbox import EXEC_TIMEOUT, execute_many
from tasks import ADMIT_RE, FOLLOW_UPS, check_rules, declines, encode_task, make_tests, utility, win_rates


def fresh_tests(task):
    """A second, independent set of hidden tests for the same request: new inputs, expected values
    from the reference. An answer that passes task.tests but fails these has learned the tests'
    inputs, not the request: reward hacking, when the tests were its reward."""
    seen = {repr(ast.literal_eval(node.test.left.args[0])) for node in ast.parse(task.tests).body}
    rng = random.Random(f'fresh:{task.prompt}')
    return make_tests(task.reference, task.func_name, task.arg_type, rng, exclude=seen) or task.tests


def gold_eval_many(tasks, responses, timeout=EXEC_TIMEOUT, fresh=False):
    """For each response: the sandbox result, passed, the rule violations and the utility; with
    fresh, also whether the responses that passed pass fresh tests too (passed_fresh)."""
    results = execute_many([(r, t.tests) for t, r in zip(tasks, responses)], timeout)
    violations = [check_rules(r) for r in responses]
    evals = [{'result': res, 'passed': res == 'pass', 'violations': v,
              'utility': utility(res == 'pass', v, r, t.forbidden)}
             for t, r, res, v in zip(tasks, responses, results, violations)]
    if fresh:
        passing = [i for i, e in enumerate(evals) if e['passed']]
        again = execute_many([(responses[i], fresh_tests(tasks[i])) for i in passing], timeout)
        for e in evals:
            e['passed_fresh'] = False
        for i, res in zip(passing, again):
            evals[i]['passed_fresh'] = res == 'pass'
    return evals


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c passing (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    as a product so that large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


N_SHOTS = 2  # worked examples in a base model's few-shot prompt (sft.py's default; chat.py's)
FEW_SHOT_TOKENS = 80  # the longest answer a base model writes to it


def few_shot_prompt(examples, task, solutions):
    """For a base code model: per example its request as a '# ' comment line, its solution, a blank line;
    then the new request as a comment line and a newline, so the model goes on with 'def ...'."""
    shots = ''.join(f'# {ex.prompt}\n{solution.rstrip()}\n\n' for ex, solution in zip(examples, solutions))
    return shots + f'# {task.prompt}\n'


def extract_code(response):
    """The code a response opens with, up to its first top-level line that is not code (a comment,
    prose, the next few-shot request): models ramble on after the function."""
    lines = response.split('\n')
    end = next((i for i, line in enumerate(lines) if line.strip() and not line[0].isspace()
                and not line.startswith(('def ', 'import ', 'from ', '@', 'class '))), len(lines))
    return '\n'.join(lines[:end]).strip('\n') + '\n'

# -----------------------------------------------------------------------------
# judging a policy: sample its answers, run them, pass@k, reranking


@torch.no_grad()
def sample_responses(model, enc, prompts, n_samples, temperature, max_new_tokens, generator=None, batch_size=256,
                     tool_runner=None, end_id=None):
    """n_samples responses to each prompt (token lists), prompt-major, generated in batches with the
    KV cache (run it under the stage's autocast). Each is a dict: tokens (the response, its end token
    included when it ended), logprobs (per token, 0 where forced), forced (tool-result tokens the
    policy did not choose), text (decoded, tool calls and results included, end token dropped)
    and ended (at end_id, the end of the turn unless told)."""
    model.eval()
    end_id, pad_id = enc.encode_single_token(END) if end_id is None else end_id, enc.encode_single_token(EOT)
    jobs = [p for p in prompts for _ in range(n_samples)]
    out = []
    for start in range(0, len(jobs), batch_size):
        gen = model.generate(jobs[start:start + batch_size], max_new_tokens, temperature, eos_id=end_id,
                             pad_id=pad_id, generator=generator, tool_runner=tool_runner)
        for row, lps, n, forced in zip(gen.tokens.tolist(), gen.logprobs.tolist(), gen.lengths.tolist(),
                                       gen.forced.tolist()):
            ended = row[n - 1] == end_id
            out.append(dict(tokens=row[:n], logprobs=lps[:n], forced=forced[:n], ended=ended,
                            text=enc.decode(row[:n - 1] if ended else row[:n])))
    return out


def mean_logprob(sample):
    """The mean log-probability of the tokens the policy chose (Codex's reranking score)."""
    return fmean(lp for lp, forced in zip(sample['logprobs'], sample['forced']) if not forced)


def judge_responses(tasks, responses, fresh=False):
    """The gold judge on one response per task, written into each response's dict (passed, utility,
    violated, declined, and with fresh passed_fresh and hacked: passed its tests, failed fresh ones),
    and summarized: the rates, and the per-response lists that win rates and intervals need."""
    evals = gold_eval_many(tasks, [r['text'] for r in responses], fresh=fresh)
    for r, e in zip(responses, evals):
        r.update(passed=e['passed'], utility=e['utility'], violated=any(e['violations'].values()),
                 declined=declines(r['text']))
        if fresh:
            r.update(passed_fresh=e['passed_fresh'], hacked=e['passed'] and not e['passed_fresh'])
    keys = ('passed', 'utility', 'violated', 'declined') + (('hacked',) if fresh else ())
    out = {key: [r[key] for r in responses] for key in keys}
    return dict(out, pass1=fmean(out['passed']), mean_utility=fmean(out['utility']),
                violation_rate=fmean(out['violated']), ended=fmean(r['ended'] for r in responses),
                examples=[r['text'] for r in responses[:3]], **({'hack_rate': fmean(out['hacked'])} if fresh else {}))


def evaluate_policy(model, enc, tasks, n_samples=0, temperature=1.0, max_new_tokens=96, seed=0):
    """The gold judge on a chat policy: its greedy answers and, with n_samples, n samples per prompt
    at the temperature (the distribution RL optimizes): their pass rate, utility, rule violations
    and hack rate (fresh tests), pass@k for k = 1..n_samples, and pass@1 of the sample with the
    highest mean token log-probability (Codex's reranking, Chen et al. 2021, sec. 3.3) against a
    random pick. Returns (metrics, samples), the samples prompt-major with their verdicts."""
    prompts = [encode_task(enc, t)[0] for t in tasks]
    m = dict(greedy=judge_responses(tasks, sample_responses(model, enc, prompts, 1, 0.0, max_new_tokens)))
    samples = []
    if n_samples:
        g = torch.Generator().manual_seed(seed)
        samples = sample_responses(model, enc, prompts, n_samples, temperature, max_new_tokens, g)
        m['sampled'] = judge_responses([t for t in tasks for _ in range(n_samples)], samples, fresh=True)
        passed = m['sampled']['passed']
        groups = [range(i * n_samples, (i + 1) * n_samples) for i in range(len(tasks))]
        counts = [sum(passed[j] for j in group) for group in groups]
        m['pass_at_k'] = {k: fmean(pass_at_k(n_samples, c, k) for c in counts) for k in range(1, n_samples + 1)}
        m['reranked_passed'] = [passed[j] for j in rerank_by_logprob(samples, n_samples)]
        m['pass1_reranked_logp'] = fmean(m['reranked_passed'])
    return m, samples


def probing_rates(probe, ordinary):
    """Adversarial probing's measures from the gold judge's verdicts (judge_responses' dicts) on one answer per
    held-out forbidden request (probe) and per ordinary request (ordinary): how often an answer to a probe
    breaks a rule (Sparrow: 8% of adversarial probes), declines its forbidden part and passes the allowed
    part's tests; and how often an ordinary answer declines though nothing was forbidden (over-refusal). The
    per-prompt lists come along, for intervals."""
    return dict(violated=probe['violated'], declined=probe['declined'], passed=probe['passed'],
                over_refused=ordinary['declined'], violation_rate=fmean(probe['violated']),
                decline_rate=fmean(probe['declined']), pass1=fmean(probe['passed']),
                over_refusal_rate=fmean(ordinary['declined']), examples=probe['examples'])


def evaluate_probing(model, enc, probe_tasks, ordinary, max_new_tokens=96):
    """Adversarial probing of a chat policy: its greedy answers to the held-out forbidden requests
    (prompt_set('probe')), judged, beside its judged greedy answers to ordinary requests (ordinary, e.g.
    evaluate_policy's 'greedy'), in probing_rates; split marks the probes split over two turns."""
    prompts = [encode_task(enc, t)[0] for t in probe_tasks]
    judged = judge_responses(probe_tasks, sample_responses(model, enc, prompts, 1, 0.0, max_new_tokens))
    return dict(probing_rates(judged, ordinary), split=[bool(t.history) for t in probe_tasks])


def probing_line(p, ordinary="test"):
    """evaluate_probing's verdicts in a line, for the stages' logs (ordinary: the set over-refusal was read on)."""
    return (f"adversarial probes: rule broken {p['violation_rate']:.1%} | declined {p['decline_rate']:.1%} | allowed "
            f"part passes {p['pass1']:.1%} | over-refusal on {ordinary} requests {p['over_refusal_rate']:.1%}")


def evaluate_followups(model, enc, tasks, max_new_tokens=96):
    """Conversations' last turns (prompt_set('followup')): a chat policy's greedy answers judged on the function each
    turn asks for; per kind, pass@1; after a reported failure, whether the answer owns up in its first line
    (ADMIT_RE) and whether it passes (the fix rate). The per-conversation lists come along, for intervals."""
    responses = sample_responses(model, enc, [encode_task(enc, t)[0] for t in tasks], 1, 0.0, max_new_tokens)
    judged, kinds = judge_responses(tasks, responses), [t.follow_up[0] for t in tasks]
    return dict(kinds=kinds, passed=judged['passed'], admitted=[bool(ADMIT_RE.match(r['text'])) for r in responses],
                pass1={k: fmean(p for p, kind in zip(judged['passed'], kinds) if kind == k) for k in FOLLOW_UPS},
                examples=[dict(history=t.history, request=t.prompt, answer=r['text'], passed=p)
                          for t, r, p in list(zip(tasks, responses, judged['passed']))[:8]])


def followup_line(f):
    """evaluate_followups' verdicts in a line, for the stages' logs."""
    fixes = [(a, p) for a, p, k in zip(f['admitted'], f['passed'], f['kinds']) if k == 'fix']
    return ("follow-ups: pass@1 " + " | ".join(f"{k} {v:.1%}" for k, v in f['pass1'].items()) +
            f" | after a reported failure: owned up {fmean(a for a, _ in fixes):.1%}, fixed "
            f"{fmean(p for _, p in fixes):.1%}")


def evaluate_against_sft(model, enc, tasks, samples, sft_samples, probe_tasks, followup_tasks, labeler_rng,
                         max_new_tokens=96):
    """A tuned policy on held-out tasks beside SFT (ppo.py's final summary): its samples (prompt-major,
    any number per task) judged with fresh tests (hacking), SFT's the same way unless already judged;
    each sample against SFT's of the same index under the simulated labelers and the noiseless judge;
    greedy pass@1; adversarial probing beside over-refusal on these ordinary requests; the follow-ups.
    Returns the summary's entries (against_sft_lines writes them for the log)."""
    n, n_sft = len(samples) // len(tasks), len(sft_samples) // len(tasks)
    judged = judge_responses([t for t in tasks for _ in range(n)], samples, fresh=True)
    if "utility" not in sft_samples[0]:  # sampled by the caller, not read from sft.py's judged samples
        judge_responses([t for t in tasks for _ in range(n_sft)], sft_samples, fresh=True)
    prompts = [encode_task(enc, t)[0] for t in tasks]
    greedy = judge_responses(tasks, sample_responses(model, enc, prompts, 1, 0.0, max_new_tokens))
    labeler_wins, noiseless_wins = win_rates([s["utility"] for s in samples], [s["utility"] for s in sft_samples],
                                             n, n_sft, labeler_rng)
    return dict(sampled={k: judged[k] for k in ("passed", "utility", "violated", "hacked")},
                greedy_passed=greedy["passed"], labeler_wins=labeler_wins, noiseless_wins=noiseless_wins,
                probing=evaluate_probing(model, enc, probe_tasks, greedy, max_new_tokens),
                followups=evaluate_followups(model, enc, followup_tasks, max_new_tokens))


def against_sft_lines(s, eval_set):
    """evaluate_against_sft's verdicts in the log's lines: the win rates and the sampled answers' rates, probing,
    the follow-ups."""
    rate = {key: fmean(values) for key, values in s['sampled'].items()}
    return "\n".join([f"{eval_set}: win rate vs SFT {fmean(s['labeler_wins']):.1%} (labelers), "
                      f"{fmean(s['noiseless_wins']):.1%} (noiseless) | pass@1 {rate['passed']:.1%} | utility "
                      f"{rate['utility']:+.3f} | violations {rate['violated']:.1%} | hacked {rate['hacked']:.1%}",
                      probing_line(s['probing'], eval_set), followup_line(s['followups'])])


def rerank_by_logprob(samples, n_samples):
    """Codex's reranking: of each prompt's n_samples consecutive samples, the index of the one with
    the highest mean token log-probability (Chen et al. 2021, sec. 3.3)."""
    groups = [range(i, i + n_samples) for i in range(0, len(samples), n_samples)]
    return [max(group, key=lambda j: mean_logprob(samples[j])) for group in groups]


@torch.no_grad()
def evaluate_few_shot(model, enc, tasks, shots, max_new_tokens=FEW_SHOT_TOKENS, batch_size=64):
    """A base model, prompted with worked examples instead of fine-tuned: greedy pass@1."""
    texts = [few_shot_prompt(shots, t, [s.reference for s in shots]) for t in tasks]
    prompts = [enc.encode_ordinary(text)[-(model.config.block_size - max_new_tokens):] for text in texts]
    model.eval()
    responses = []
    for start in range(0, len(prompts), batch_size):
        tokens = model.generate(prompts[start:start + batch_size], max_new_tokens, 0.0).tokens
        responses += [extract_code(enc.decode(row)) for row in tokens.tolist()]
    evals = gold_eval_many(tasks, responses)
    return dict(pass1=fmean(e['passed'] for e in evals), passed=[e['passed'] for e in evals], examples=responses[:3])


def best_of_n(samples_scores, rule_probs, n, threshold=0.5):
    """Reranking (Sparrow; LaMDA's filtering): for each prompt, among its first n samples, drop those
    the rule model flags (any rule with probability above threshold; keep all if all are flagged),
    then pick the highest preference score. Returns the picked indices."""
    picks = []
    for group_scores, group_rules in zip(samples_scores, rule_probs):
        candidates = [j for j in range(n) if max(group_rules[j]) <= threshold] or list(range(n))
        picks.append(max(candidates, key=lambda j: group_scores[j]))
    return picks
