"""RL on the factual questions with the gold judge as the reward (ppo.py --reward evidence): the score
is 1 for a supported and right answer and 0 for anything less, the rollout prompts are about training
entries only, and in a rollout with the toolset the forced tool results are never actions."""
import os
import sysconfig

import pytest
import torch

from data import CALL, CALL_END, END, RESULT, RESULT_END, encode_chat, render_response
from model import GPT, GPTConfig
from ppo import pack_rollouts, reward_from_evidence, rollout_batch, sequence_score
from tools import ToolRunner, build_index, demonstrate_fact, question_set, run_tool

STDLIB = sysconfig.get_paths()["stdlib"]
FILES = ("textwrap.py", "json/__init__.py", "json/decoder.py", "email/utils.py")  # email: held out (data.is_val)


@pytest.fixture(scope="module")
def index():
    sources = []
    for name in FILES:
        with open(os.path.join(STDLIB, name)) as f:
            sources.append((name, f.read()))
    return build_index(sources)


def test_the_score_is_one_only_for_a_right_and_attributable_answer(index):
    q = next(q for q in question_set(index, "rl_train", 40, 0) if q.kind == "default")
    supported = render_response(demonstrate_fact(index, q, True))
    unsupported = supported.replace(f'"{q.evidence}"', '"as the docs say"')  # right, the quote is not the evidence
    wrong = supported.replace(f"`{q.answer}`", "`0`" if q.answer != "0" else "`1`")  # attributable, not right
    passed, verdicts = reward_from_evidence(index, [q] * 4, [supported, unsupported, wrong, "I am not sure."])
    assert [(v["right"], v["attributable"]) for v in verdicts[:3]] == [(True, True), (True, False), (False, True)]
    assert passed.tolist() == [1.0, 0.0, 0.0, 0.0]
    # the score: the judge's, never the reward model's; minus the rules and the missing-end penalty as ever
    score = sequence_score(torch.tensor([5.0, 5.0, -5.0, 5.0]), passed, torch.zeros(4, 2),
                           torch.tensor([1.0, 1.0, 1.0, 0.0]), "evidence", 1.0, 1.0, 1.0)
    assert score.tolist() == [1.0, 0.0, 0.0, -1.0]


def test_rollout_questions_are_about_training_entries_and_not_sfts(index):
    rl, sft = question_set(index, "rl_train", 60, 0), question_set(index, "sft_train", 60, 0)
    assert all(q.name is None or not index.by_name[q.name].heldout for q in rl)  # never the judged modules
    assert [q.prompt for q in rl] != [q.prompt for q in sft]  # their own draws


def test_forced_tool_results_are_not_actions_in_a_rollout_with_the_toolset(enc, index):
    """A scripted policy (its head pushed to the script's next token, greedy) calls the lookup,
    lets the engine force the result, and answers with the quote: the real engine and ToolRunner, and
    the loop's rollout_batch. The actions are exactly the script; the result's tokens are off the mask."""
    q = next(q for q in question_set(index, "rl_train", 40, 0) if q.name is not None)
    special = {t: enc.encode_single_token(t) for t in (CALL, CALL_END, RESULT, RESULT_END, END)}
    result = [special[RESULT], *enc.encode_ordinary(run_tool(index, q.query)), special[RESULT_END]]
    call = [special[CALL], *enc.encode_ordinary(q.query), special[CALL_END]]
    answer = enc.encode_ordinary(demonstrate_fact(index, q, False)[0][1]) + [special[END]]
    script = call + [0] * len(result) + answer  # 0: the forced steps, whatever the policy would pick
    prompt = encode_chat(enc, q.prompt)[0]
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=len(prompt) + len(script), vocab_size=enc.n_vocab, n_layer=1, n_head=2,
                           n_embd=16)).eval()
    step = [0]

    def follow_script(module, inputs, logits):  # the prompt's forward, then one forward per token
        bias = torch.zeros(enc.n_vocab)
        bias[script[step[0]]] = 8.0  # the top token, yet with a log-probability below 0
        step[0] += 1
        return logits + bias

    hook = policy.lm_head.register_forward_hook(follow_script)
    gen = policy.generate([prompt], len(script), 0.0, eos_id=special[END], pad_id=0,
                          tool_runner=ToolRunner(enc, index))
    hook.remove()
    responses, ended, x, targets, mask, sampled = rollout_batch([prompt], gen, special[END], 0, torch.device("cpu"))
    assert responses == [call + result + answer] and ended.tolist() == [1.0]
    assert targets[mask.bool()].tolist() == call + answer  # the actions: what the policy chose, no result token
    span = slice(len(prompt) - 1 + len(call), len(prompt) - 1 + len(call) + len(result))
    assert targets[0, span].tolist() == result and mask[0, span].sum() == 0 and sampled[0, span].abs().sum() == 0
    assert (sampled[mask.bool()] < 0).all()  # the actions keep their log-probabilities
    assert torch.equal(mask, pack_rollouts([prompt], responses, 0, torch.device("cpu"), gen.forced.tolist())[2])
    assert reward_from_evidence(index, [q], [enc.decode(responses[0][:-1])])[0].tolist() == [1.0]  # judged supported
