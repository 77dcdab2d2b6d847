"""The fused attention kernel against plain float64 attention, forward and backward, on the GPU
when there is one, else under Triton's interpreter on CPU (tests/conftest.py sets it). The
interpreter accepts what a GPU compiler rejects, so one test also compiles every launch config the
autotuner may pick, ahead of time, for the A100 (sm_80) and H100 (sm_90): no GPU needed, the
triton wheel ships ptxas."""
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

pytest.importorskip("triton")  # the kernel needs it; the rest of the project does not
import flash_attention as fa  # noqa: E402
from flash_attention import DTYPES, HEAD_DIMS, flash_attention, launch_configs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block: A100, H100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(q, k, v, key_start=None):
    # float64 math attention, query i at key position T_k - T_q + i; keys before key_start[b]
    # are padding, hidden from every query of row b but the padding query at the same position
    T_q, T_k = q.shape[2], k.shape[2]
    pos, key = torch.arange(T_k - T_q, T_k, device=q.device)[:, None], torch.arange(T_k, device=q.device)
    keep = key <= pos  # (T_q, T_k)
    if key_start is not None:
        keep = keep & (key >= key_start.view(-1, 1, 1, 1)) | (key == pos)  # (B, 1, T_q, T_k)
    att = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    return att.masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()


def make_qkv(B, nh, T_q, T_k, hs, dtype, seed, layout="contiguous"):
    """q, k, v and an upstream gradient. layout: contiguous (B, nh, T, hs); "model", views of
    one (B, T, 3 * nh * hs) tensor as the GPT's c_attn makes them; "cache", k and v the first
    T_k positions of a longer (B, nh, T_max, hs) buffer, as a KV cache hands them over."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)
    if layout == "model":
        q = randn(B, T_q, 3, nh, hs)[:, :, 0].transpose(1, 2)
        kv = randn(B, T_k, 3, nh, hs)
        k, v = kv[:, :, 1].transpose(1, 2), kv[:, :, 2].transpose(1, 2)
    elif layout == "cache":
        q = randn(B, nh, T_q, hs)
        k, v = randn(2, B, nh, T_k + 19, hs)[:, :, :, :T_k]
    else:
        q, k, v = randn(B, nh, T_q, hs), randn(B, nh, T_k, hs), randn(B, nh, T_k, hs)
    return q, k, v, randn(B, nh, T_q, hs)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_against_reference(B, nh, T_q, T_k, hs, dtype, seed, layout="contiguous", pad=None):
    q, k, v, w = make_qkv(B, nh, T_q, T_k, hs, dtype, seed, layout)
    key_start = None if pad is None else torch.tensor(pad, device=DEVICE)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v, key_start)
    assert o.dtype == dtype and o.shape == q.shape
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64 = reference(q64, k64, v64, key_start)
    grads64 = torch.autograd.grad((o64 * w.double()).sum(), (q64, k64, v64))
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64)):
        assert x.dtype == dtype
        err = rel_err(x, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


# (B, nh, T_q, T_k, hs, layout, first real key per row): T off the tiles, several tiles, decoding,
# chunked prefill, left padding longer than a tile and down to one real key, KV-cache slices
SHAPES = [(1, 2, 17, 17, 16, "contiguous", None), (2, 1, 130, 130, 32, "model", None),
          (1, 2, 200, 200, 64, "contiguous", None), (2, 3, 64, 64, 64, "model", [0, 30]),
          (1, 1, 150, 150, 128, "contiguous", None), (1, 2, 37, 100, 32, "cache", None),
          (2, 1, 1, 77, 16, "cache", [0, 40]), (1, 1, 70, 260, 128, "model", None),
          (3, 1, 140, 140, 64, "model", [0, 70, 139]), (2, 2, 9, 150, 128, "cache", [3, 100])]


@pytest.mark.parametrize("dtype", DTYPES)  # on CPU, bf16 runs in fp32 (see flash_attention())
@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_matches_float64_reference(i, dtype):
    B, nh, T_q, T_k, hs, layout, pad = SHAPES[i]
    check_against_reference(B, nh, T_q, T_k, hs, dtype, seed=10 * i + DTYPES.index(dtype),
                            layout=layout, pad=pad)


# every config the autotuner may pick, alone, on a padded chunk: tile sizes move every boundary
@pytest.mark.parametrize("kernel,hs,config", [(name, hs, c) for name, by_hs in fa.CONFIGS.items()
                                              for hs, configs in by_hs.items() for c in configs])
def test_every_launch_config(kernel, hs, config, monkeypatch):
    monkeypatch.setitem(fa.CONFIGS[kernel], hs, [config])  # one candidate: no timing, no choice
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # bf16 is fp32 on the CPU
    check_against_reference(2, 1, 70, 200, hs, dtype, seed=hs, layout="model", pad=[5, 150])


def test_decode_and_chunked_prefill_match_the_full_pass():
    q, k, v, _ = make_qkv(2, 2, 90, 90, 32, torch.float32, seed=3, layout="model")
    full = flash_attention(q, k, v)
    for T_q in (1, 7, 40):  # one decoding step after a KV cache, then two prefill chunks
        part = flash_attention(q[:, :, -T_q:], k, v)
        torch.testing.assert_close(part, full[:, :, -T_q:], rtol=1e-5, atol=1e-6)
    # a chunk in the middle sees only the keys up to its own end
    torch.testing.assert_close(flash_attention(q[:, :, 30:50], k[:, :, :50], v[:, :, :50]),
                               full[:, :, 30:50], rtol=1e-5, atol=1e-6)


def test_backward_is_bitwise_deterministic():
    q, k, v, w = make_qkv(2, 2, 150, 150, 64, torch.float16, seed=5, layout="model")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    runs = [torch.autograd.grad((flash_attention(q, k, v) * w).sum(), (q, k, v)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # no atomics: the same sums in order


def test_bad_inputs_raise():
    x = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(*(torch.randn(1, 2, 8, 24, device=DEVICE),) * 3)
    with pytest.raises(ValueError, match="T_q <= T_k"):
        flash_attention(torch.randn(1, 2, 9, 32, device=DEVICE), x, x)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(x, x.half(), x)
    with pytest.raises(ValueError, match="wants q"):
        flash_attention(x, torch.randn(1, 3, 8, 32, device=DEVICE), x)
    with pytest.raises(ValueError, match="devices"):
        flash_attention(x, x.to("meta"), x)
    with pytest.raises(ValueError, match="key_start"):
        flash_attention(x, x, x, torch.tensor([0.5], device=DEVICE))


def compile_all(cc):
    """Compile every kernel at every config it may launch with for sm_{cc}, specialized as a
    launch from torch would be, and check that it fits; runs without TRITON_INTERPRET (below)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    kernels = {"fwd": fa._fwd_kernel, "dkdv": fa._bwd_dkdv_kernel, "dq": fa._bwd_dq_kernel}
    launches = {}  # (kernel, hs, dtype, config) -> whether it must not spill on this card
    # fp16 takes the tiles of bf16 and compiles to the same footprint: left out, to save minutes; so are
    # head dims 16 and 32 (the tiles of 64, a smaller footprint), and fp32 (never autotuned: one small
    # tile) but at the largest head dim, its largest footprint
    for hs, dtype, T_q, name in itertools.product((64, 128), (torch.float32, torch.bfloat16), (1, 1024), kernels):
        if dtype == torch.float32 and hs != max(HEAD_DIMS):
            continue
        for i, cfg in enumerate(launch_configs(name, hs, dtype, T_q)):
            key = (kernels[name], hs, dtype, cfg)
            launches[key] = launches.get(key, False) or cc == 90 or i == 0
    for (kernel, hs, dtype, (block_m, block_n, warps, stages)), strict in launches.items():
        consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": hs,
                  "PREC": "tf32x3" if dtype == torch.float32 else "tf32"}
        consts = {n: c for n, c in consts.items() if n in kernel.arg_names}
        sig, attrs = {}, {}
        for j, name in enumerate(kernel.arg_names):  # pointers have upper-case names
            if name in consts:
                sig[name] = "constexpr"
            elif name.isupper():
                sig[name] = {"LSE": "*fp32", "DELTA": "*fp32", "KS": "*i32"}.get(name, "*" + names[dtype])
            else:
                sig[name] = "fp32" if name.endswith("scale") else "i32"
            if name.isupper() and name not in consts or re.fullmatch(r"s[a-z]+_[bht]", name):
                attrs[(j,)] = [["tt.divisibility", 16]]  # torch's pointers and strides are
        ck = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", cc, 32),
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
        # a 16-bit candidate may spill on the A100 (then the timing rejects it), never on the H100;
        # nor may the first of each list, the only one toy head dims get (fp32 is the exact path)
        assert spill == 0 or dtype == torch.float32 or not strict, "registers spill on the fast path"


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
