"""
Causal attention on one GPU: our Triton kernel (flash_attention.py) against each PyTorch SDPA
backend (FlashAttention-2, cuDNN, memory-efficient) and the readable math path of model.py.

First a bf16 correctness check of the kernel against the math path (forward and gradients), then
forward and forward+backward TFLOP/s and peak memory for head dims 64 and 128 over sequence
lengths 512..8192 at a fixed 16384 tokens per batch, then a one-line summary at T=1024, hs=64,
then a whole training step of the gpu preset's model with each path (tokens/s, MFU).
Causal FLOPs are half of the full 4*B*nh*T^2*hs forward; the backward counts 2.5x the forward
(FlashAttention-2 paper, section 4), so forward+backward is 3.5x. About 3 minutes on an H100.

    python bench/attention.py            # the full sweep
    python bench/attention.py --quick    # fewer lengths and repeats, to check it runs
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENS = 16384  # B * T, fixed so every length does the same work per token
N_HEAD = {64: 16, 128: 8}  # model width 1024 either way
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_paths():
    """name -> f(q, k, v), every path computing causal attention on (B, nh, T, hs)."""
    from flash_attention import flash_attention
    from model import attention
    paths = {"ours": flash_attention}
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        paths[name] = sdpa
    paths["math"] = lambda q, k, v: attention(q, k, v, "math")
    return paths


def qkv(B, nh, T, hs, dtype=torch.bfloat16):
    return [torch.randn(B, nh, T, hs, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(3)]


def check_correctness(paths):
    """Our kernel and the math path, both in bf16, against the math path in fp32; the kernel
    must be at least about as close as bf16 math is (it rounds less: fp32 accumulators)."""
    print("correctness, bf16 vs the fp32 math path (relative error):")
    for B, nh, T, hs in [(2, 16, 1024, 64), (1, 8, 777, 128), (4, 4, 100, 32)]:
        q, k, v = qkv(B, nh, T, hs)
        do = torch.randn_like(q)
        ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
        out_ref = paths["math"](*ref)
        want = [out_ref, *torch.autograd.grad(out_ref, ref, do.float())]
        errs = {}
        for name in ("ours", "math"):
            out = paths[name](q, k, v)
            got = [out, *torch.autograd.grad(out, (q, k, v), do)]
            errs[name] = [((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
        print(f"  B={B} nh={nh} T={T} hs={hs}: " + " | ".join(
            f"{n} {e_ours:.1e} (bf16 math {e_math:.1e})"
            for n, e_ours, e_math in zip(("o", "dq", "dk", "dv"), errs["ours"], errs["math"])))
        if max(errs["ours"]) > max(2 * max(errs["math"]), 1e-2):
            sys.exit("FAILED: the kernel is further from the fp32 reference than bf16 math is")


def time_ms(fn, reps):
    fn()  # warmup: compiles the kernels and settles the allocator
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench_attention(paths, head_dims, lengths, reps):
    """Forward and forward+backward speed and peak memory of every path; returns
    {(hs, T, name): fwd+bwd ms} for the summary."""
    results = {}
    print(f"\n{'hs':>4} {'T':>5} {'path':>15} | {'fwd ms':>8} {'TFLOP/s':>8} | "
          f"{'fwd+bwd ms':>10} {'TFLOP/s':>8} | {'peak MiB':>9}")
    for hs in head_dims:
        for T in lengths:
            B, nh = TOKENS // T, N_HEAD[hs]
            flops_fwd = 0.5 * 4 * B * nh * T * T * hs  # causal: half the score matrix
            q, k, v = qkv(B, nh, T, hs)
            do = torch.randn_like(q)
            for name, fn in paths.items():
                prefix = f"{hs:>4} {T:>5} {name:>15} |"
                try:
                    fwd = time_ms(lambda: fn(q, k, v), reps)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    both = time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), reps)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20  # over the inputs
                except torch.cuda.OutOfMemoryError:
                    print(f"{prefix} out of memory")
                    torch.cuda.empty_cache()
                    continue
                except RuntimeError as e:  # an SDPA backend that does not take this input
                    print(f"{prefix} unavailable: {str(e).splitlines()[0][:80]}")
                    continue
                results[hs, T, name] = both
                print(f"{prefix} {fwd:8.3f} {flops_fwd / fwd / 1e9:8.1f} | {both:10.3f} "
                      f"{3.5 * flops_fwd / both / 1e9:8.1f} | {peak:9.0f}")
            torch.cuda.empty_cache()
    return results


def summarize(results, hs=64, T=1024):
    ours = results.get((hs, T, "ours"))
    if ours is None:
        print(f"\nsummary: no timing of our kernel at T={T}, hs={hs}")
        return
    line = f"\nsummary T={T} hs={hs} fwd+bwd: ours {ours:.3f} ms"
    if (hs, T, "math") in results:
        math_ms = results[hs, T, "math"]
        line += f" | math {math_ms:.3f} ms, speedup over math {math_ms / ours:.2f}x"
    sdpa = {n: results[hs, T, n] for n in SDPA_BACKENDS if (hs, T, n) in results}
    if sdpa:
        best = min(sdpa, key=sdpa.get)
        line += f" | best SDPA {best} {sdpa[best]:.3f} ms, ours/best = {ours / sdpa[best]:.2f}"
    print(line)


def training_step_ms(path, p, reps):
    """Milliseconds per training step (forward, backward, AdamW) of the gpu preset's model with
    one attention path, or None when it does not fit in memory."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                          vocab_size=4096, attn=path)).cuda()
    opt = model.configure_optimizers(6e-4, 0.1, (0.9, 0.95), "cuda")
    x = torch.randint(0, 4096, (p["batch_size"], p["block_size"]), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    try:
        return time_ms(step, reps)
    except torch.cuda.OutOfMemoryError:
        return None


def bench_training_step(reps):
    """A whole training step of the gpu preset's model, GPT-2 small at block 1024 with our
    4096-token vocabulary, with each attention path: bf16 autocast, eager (torch.compile would
    take minutes per path). Tokens/s and MFU against the card's datasheet peak."""
    from model import GPT, GPTConfig
    from common import peak_flops
    from pretrain import PRESETS
    p = PRESETS["gpu"]
    tokens, peak = p["batch_size"] * p["block_size"], peak_flops(torch.device("cuda"))
    flops = GPT(GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                          vocab_size=4096)).flops_per_token(p["block_size"])
    print(f"\ntraining step, GPT-2 small shape, {p['batch_size']} x {p['block_size']} tokens, bf16 autocast, eager:")
    for path in ("flash", "sdpa", "math"):
        ms = training_step_ms(path, p, reps)
        torch.cuda.empty_cache()
        if ms is None:
            print(f"  {path:>5}: out of memory")
            continue
        tok_s = tokens / ms * 1000
        print(f"  {path:>5}: {ms:8.1f} ms/step | {tok_s:10,.0f} tok/s | mfu {flops * tok_s / peak * 100:5.1f}%")


def main():
    parser = argparse.ArgumentParser(description="causal attention: our kernel vs SDPA and math")
    parser.add_argument("--quick", action="store_true", help="two lengths, hs=64, fewer repeats")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); on CPU, "
                 "the kernel's correctness is checked by tests/test_flash_attention.py instead")
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
          f" | {datetime.datetime.now().isoformat(timespec='seconds')}")
    paths = attention_paths()
    check_correctness(paths)
    head_dims, lengths, reps = ((64,), (1024, 4096), 3) if args.quick else \
        ((64, 128), (512, 1024, 2048, 4096, 8192), 10)
    results = bench_attention(paths, head_dims, lengths, reps)
    summarize(results)
    bench_training_step(reps)


if __name__ == "__main__":
    main()
