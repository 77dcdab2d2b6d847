"""The GPT on the fused attention path: model.attention with left padding on every path; the GPT
against the math path; batched generation of left-padded prompts; and torch.compile, where the
kernel must reach the compiled graph as one opaque op per layer (flash_attention::fwd, and its
backward op), not as traced Triton launches. On CPU the op's kernels run under Triton's
interpreter (conftest.py) and the rest runs eagerly through AOTAutograd; on a GPU, inductor compiles
it all."""
import math

import pytest
import torch

pytest.importorskip("triton")
import model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_gpt(attn="flash"):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32, zero_init=False,
                         attn=attn)).to(DEVICE)


@pytest.fixture
def full_fp32_matmul():
    # fp32 means fp32 here (no TF32 on a GPU); set and restored through the public call, since
    # pytest cannot undo a setattr on torch's cuBLAS module under every version
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def loss_and_grads(gpt, idx, targets):
    loss = gpt(idx, targets)[1]
    return loss, torch.autograd.grad(loss, list(gpt.parameters()))


@pytest.mark.parametrize("path", ["math", "sdpa", "flash"])
def test_attention_takes_key_start_on_every_path(path, full_fp32_matmul):
    # left padding as model.generate once built it: a boolean mask, causal and over real keys
    # only, where each padding query sees itself; the softmax written out against it
    torch.manual_seed(9)
    q, k, v, w = (torch.randn(3, 2, 40, 32, device=DEVICE) for _ in range(4))
    key_start = torch.tensor([0, 13, 39], device=DEVICE)
    keys, eye = torch.arange(40, device=DEVICE), torch.eye(40, dtype=torch.bool, device=DEVICE)
    mask = eye | torch.ones_like(eye).tril() & (keys >= key_start[:, None, None, None])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    want = (q @ k.transpose(-2, -1) / math.sqrt(32)).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    got = model.attention(q, k, v, path, key_start=key_start)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)),
                    torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # SDPA on CPU: ~2e-6 for 0


def test_gpt_with_flash_matches_math_path():
    gpt = tiny_gpt()
    idx, targets = torch.randint(0, 97, (2, 50), device=DEVICE), torch.randint(0, 97, (2, 50), device=DEVICE)
    results = []
    for path in ("flash", "math"):  # the model reads the path at call time: same weights
        gpt.config.attn = path
        results.append(loss_and_grads(gpt, idx, targets))
    (loss_flash, grads_flash), (loss_math, grads_math) = results
    torch.testing.assert_close(loss_flash, loss_math, rtol=1e-6, atol=1e-6)
    for g_flash, g_math in zip(grads_flash, grads_math):
        torch.testing.assert_close(g_flash, g_math, rtol=1e-4, atol=1e-6)


def test_batched_generation_with_flash_matches_math_path():
    # left-padded prompts of different lengths, a KV cache, rows that end early
    gpt = tiny_gpt().eval()
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2, 6, 6, 1, 2], [11]]
    runs = []
    for path in ("flash", "math"):
        gpt.config.attn = path
        runs.append(gpt.generate(prompts, 12, temperature=0, eos_id=13, pad_id=0)[:3])
    (tokens, logprobs, lengths), (tokens_math, logprobs_math, lengths_math) = runs
    assert torch.equal(tokens, tokens_math) and torch.equal(lengths, lengths_math)
    torch.testing.assert_close(logprobs, logprobs_math, rtol=1e-4, atol=1e-5)


def test_compiled_gpt_calls_the_kernel_as_one_op_and_matches_eager(monkeypatch):
    # as a compiled training run meets it: the kernel not yet imported and the path not yet
    # announced, so both happen inside the trace; fullgraph=True fails on any graph break
    monkeypatch.setattr(model, "_flash_attention", None)
    monkeypatch.setattr(model, "_announced", set())
    graphs = []

    def backend(gm, example_inputs):  # after a look at its input: inductor on a card; on CPU, AOTAutograd
        graphs.append(gm)  # with the op's fake and backward but eager kernels (inductor's C++ build takes 25 s)
        return torch._dynamo.lookup_backend("inductor" if DEVICE == "cuda" else "aot_eager")(gm, example_inputs)
    gpt = tiny_gpt()
    idx, targets = torch.randint(0, 97, (2, 50), device=DEVICE), torch.randint(0, 97, (2, 50), device=DEVICE)
    loss, grads = loss_and_grads(torch.compile(gpt, backend=backend, fullgraph=True), idx, targets)
    ops = [node.target for node in graphs[0].graph.nodes]
    assert ops.count(torch.ops.flash_attention.fwd.default) == gpt.config.n_layer
    loss_eager, grads_eager = loss_and_grads(gpt, idx, targets)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-6)
