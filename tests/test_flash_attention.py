"""The fused attention kernel against plain float64 attention, forward and backward. On CPU the
kernels run under Triton's interpreter (tests/conftest.py sets it); the interpreter accepts what a
GPU compiler rejects, so one test also compiles every launch config ahead of time for the A100
(sm_80) and H100 (sm_90), which needs no GPU: the triton wheel ships ptxas."""
import math
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

pytest.importorskip("triton")  # the kernel needs it; the rest of the project does not
from flash_attention import DTYPES, HEAD_DIMS, flash_attention, launch_config  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block: A100, H100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(q, k, v):
    # float64 math attention, query i at key position T_k - T_q + i (the mask's diagonal offset)
    T_q, T_k = q.shape[2], k.shape[2]
    att = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    keep = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(T_k - T_q)
    return att.masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()


def make_qkv(B, nh, T_q, T_k, hs, dtype, seed, transposed, device="cpu"):
    # transposed: the model's layout, views of (B, T, nh, hs); else contiguous (B, nh, T, hs)
    g = torch.Generator(device).manual_seed(seed)
    def one(T):
        if transposed:
            return torch.randn(B, T, nh, hs, generator=g, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, nh, T, hs, generator=g, device=device).to(dtype)
    return one(T_q), one(T_k), one(T_k), one(T_q)  # q, k, v, and an upstream gradient


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_against_reference(B, nh, T_q, T_k, hs, dtype, seed, transposed, device="cpu"):
    q, k, v, w = make_qkv(B, nh, T_q, T_k, hs, dtype, seed, transposed, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v)
    assert o.dtype == dtype and o.shape == q.shape
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64 = reference(q64, k64, v64)
    grads64 = torch.autograd.grad((o64 * w.double()).sum(), (q64, k64, v64))
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64)):
        assert x.dtype == dtype
        err = rel_err(x, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


# (B, nh, T_q, T_k, hs): T not multiples of the tiles, several tiles, decode and chunked prefill
SHAPES = [(1, 2, 17, 17, 16), (2, 1, 130, 130, 32), (1, 2, 200, 200, 64), (2, 3, 64, 64, 64),
          (1, 1, 150, 150, 128), (1, 2, 37, 100, 32), (2, 1, 1, 77, 16), (1, 1, 70, 260, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_matches_float64_reference(i, dtype):
    check_against_reference(*SHAPES[i], dtype, seed=10 * i + DTYPES.index(dtype),
                            transposed=i % 2 == 1)


def test_bf16():
    # on CPU the wrapper runs the interpreter in fp32 and rounds back; on a GPU, native bf16
    check_against_reference(2, 2, 96, 96, 64, torch.bfloat16, seed=7, transposed=True)


def test_decode_and_chunked_prefill_match_the_full_pass():
    q, k, v, _ = make_qkv(2, 2, 90, 90, 32, torch.float32, seed=3, transposed=True)
    full = flash_attention(q, k, v)
    for T_q in (1, 7, 40):  # one decoding step after a KV cache, then two prefill chunks
        part = flash_attention(q[:, :, -T_q:], k, v)
        torch.testing.assert_close(part, full[:, :, -T_q:], rtol=1e-5, atol=1e-6)
    # a chunk in the middle sees only the keys up to its own end
    torch.testing.assert_close(flash_attention(q[:, :, 30:50], k[:, :, :50], v[:, :, :50]),
                               full[:, :, 30:50], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    x = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(*(torch.randn(1, 2, 8, 24),) * 3)
    with pytest.raises(ValueError, match="T_q <= T_k"):
        flash_attention(torch.randn(1, 2, 9, 32), x, x)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(x, x.half(), x)
    with pytest.raises(ValueError, match="wants q"):
        flash_attention(x, torch.randn(1, 3, 8, 32), x)
    with pytest.raises(ValueError, match="devices"):
        flash_attention(x, x.to("meta"), x)


def compile_all(cc):
    """Compile every kernel at every launch config for sm_{cc}, specialized as a launch from torch
    would be, and check that it fits; runs in a process without TRITON_INTERPRET (test below)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import flash_attention as fa
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for hs, dtype in [(hs, dtype) for hs in HEAD_DIMS for dtype in DTYPES]:
        cfg = launch_config(hs, dtype)
        for kernel, (block_m, block_n, warps, stages) in [
                (fa._fwd_kernel, cfg["fwd"]), (fa._bwd_dkdv_kernel, cfg["dkdv"]),
                (fa._bwd_dq_kernel, cfg["dq"]), (fa._bwd_preprocess, (cfg["dq"][0], 0, 4, 1))]:
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": hs,
                      "PREC": "tf32x3" if dtype == torch.float32 else "tf32"}
            consts = {n: c for n, c in consts.items() if n in kernel.arg_names}
            sig, attrs = {}, {}
            for j, name in enumerate(kernel.arg_names):  # pointers have upper-case names
                if name in consts:
                    sig[name] = "constexpr"
                elif name.isupper():
                    sig[name] = "*fp32" if name in ("LSE", "DELTA") else "*" + names[dtype]
                else:
                    sig[name] = "fp32" if name.endswith("scale") else "i32"
                if name.isupper() and name not in consts or re.fullmatch(r"s[a-z]+_[bht]", name):
                    attrs[(j,)] = [["tt.divisibility", 16]]  # torch's pointers and strides are
            src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
            ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # spills: local memory
                f.write(ck.asm["cubin"])
                f.flush()
                usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                                       capture_output=True, text=True, check=True).stdout
            spill = int(re.search(r"STACK:(\d+)", usage).group(1))
            print(f"sm_{cc} {kernel.__name__:17} hs={hs:3} {names[dtype]} "
                  f"{(block_m, block_n, warps, stages)} shared={ck.metadata.shared} spill={spill}")
            assert ck.metadata.shared <= SHARED_LIMIT[cc], "needs more shared memory than the card"
            assert spill == 0 or dtype == torch.float32, "registers spill on the 16-bit fast path"


def test_compiles_for_a100_and_h100():
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    code = f"import sys; sys.path[:0] = {[ROOT, os.path.dirname(__file__)]!r}; " \
           "import test_flash_attention as t; t.compile_all(int(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cc)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for cc in SHARED_LIMIT]
    outs = [p.communicate()[0] for p in procs]  # both targets at once, one per core
    print("".join(outs))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def test_gpt_with_flash_matches_math_path():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32,
                          attn="flash"))
    idx, targets = torch.randint(0, 97, (2, 50)), torch.randint(0, 97, (2, 50))
    losses, grads = [], []
    for path in ("flash", "math"):  # the model reads the path at call time: same weights
        model.config.attn = path
        loss = model(idx, targets)[1]
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for g_flash, g_math in zip(*grads):
        torch.testing.assert_close(g_flash, g_math, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_float64_reference(dtype):
    for i, shape in enumerate([(2, 4, 1024, 1024, 64), (1, 2, 333, 333, 128), (2, 2, 100, 700, 32),
                               (4, 2, 1, 515, 16)]):
        check_against_reference(*shape, dtype, seed=i, transposed=i % 2 == 0, device="cuda")
