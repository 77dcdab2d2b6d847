"""The generation engine: streaming, and tool results forced into a row mid-answer."""
import torch

from model import GPT, GPTConfig
from tools import ToolRunner


def tiny():
    """A random model with large weights, so that its greedy answers vary instead of repeating."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=2, n_embd=16, attn="math")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


class FakeTools(ToolRunner):
    """A tool that answers every call with the same three tokens, and records what it was given
    (ToolRunner.forcing, which the engine calls, forces them)."""
    result = [50, 51, 52]

    def __init__(self, call_end_id):  # no tokenizer, no index: this tool never decodes a call
        self.call_end_id, self.calls = call_end_id, []

    def __call__(self, response):
        self.calls.append(list(response))
        return list(self.result)


PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2], [11], [30, 31]]


def call_token_hit_at_different_steps(model, n_new):
    """A token that the greedy answers of at least two prompts first write at different steps,
    so that rows call the tool at different times."""
    free = model.generate(PROMPTS, n_new, temperature=0).tokens.tolist()
    for tok in range(61):
        firsts = {row.index(tok) for row in free if tok in row}
        if len(firsts) >= 2:
            return tok
    raise AssertionError("no token to use as the call end")


def test_forced_tokens_in_a_batch_equal_each_row_alone_and_are_flagged():
    model, n_new = tiny(), 20
    call_end = call_token_hit_at_different_steps(model, n_new)
    tools = FakeTools(call_end)
    batch = model.generate(PROMPTS, n_new, temperature=0, eos_id=59, tool_runner=tools)
    assert len(tools.calls) >= 2
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate([prompt], n_new, temperature=0, eos_id=59, tool_runner=FakeTools(call_end))
        n = int(batch.lengths[i])
        assert n == int(alone.lengths[0]) and batch.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist()
        assert batch.forced[i, :n].tolist() == alone.forced[0, :n].tolist()
        # where forced: exactly the tool's tokens, right after each call end, with log-probability 0
        row, expected = batch.tokens[i, :n].tolist(), [False] * n
        t = 0
        while t < n:
            if row[t] == call_end and not expected[t]:
                for j in range(t + 1, min(n, t + 1 + len(FakeTools.result))):
                    expected[j] = True
                    assert row[j] == FakeTools.result[j - t - 1]
                t += len(FakeTools.result)
            t += 1
        assert batch.forced[i, :n].tolist() == expected
        assert (batch.logprobs[i, :n][batch.forced[i, :n]] == 0).all()
        assert (batch.logprobs[i, :n][~batch.forced[i, :n]] < 0).all()


def test_the_model_conditions_on_the_forced_result():
    """After the result, the row's logits are those of a plain forward over everything so far."""
    model, n_new = tiny(), 12
    call_end = call_token_hit_at_different_steps(model, n_new)
    gen = model.generate([PROMPTS[0]], n_new, temperature=0, tool_runner=FakeTools(call_end))
    seq = PROMPTS[0] + gen.tokens[0].tolist()
    logits = model(torch.tensor([seq]))[0][0]
    for t in range(n_new):
        if not gen.forced[0, t]:
            assert int(logits[len(PROMPTS[0]) + t - 1].argmax()) == seq[len(PROMPTS[0]) + t]


def test_streaming_yields_what_generate_returns():
    model = tiny()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    collected = model.generate(PROMPTS, 10, temperature=1.0, eos_id=7, generator=g1)
    rows_tokens = {i: [] for i in range(len(PROMPTS))}
    for rows, tokens, logprobs, forced in model.generate_stream(PROMPTS, 10, temperature=1.0, eos_id=7, generator=g2):
        for row, tok in zip(rows.tolist(), tokens.tolist()):
            rows_tokens[row].append(tok)
    for i in range(len(PROMPTS)):
        assert rows_tokens[i] == collected.tokens[i, :int(collected.lengths[i])].tolist()
