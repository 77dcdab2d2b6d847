"""
The first minutes on a GPU: what this project claims about a card, checked in one run.

    python bench/gpu_check.py                     # every part, 7 minutes at most (--budget)
    python bench/gpu_check.py --parts correct perf
    python bench/gpu_check.py --dry               # on CPU: tiny sizes, the kernel under Triton's
                                                  # interpreter; checks the script, not the card

Each part runs in its own process with its own time limit, so that a crash, a hang or running
out of memory in one cannot hide the others; parts run in the order below until the budget is
spent, and a summary at the end holds what they measured against the goals.

- env: versions of torch, triton, CUDA, cuDNN; the card; which of the project's packages import.
- correct: our kernel in bf16 and fp16 against float64, forward and the three gradients: ragged T,
  T_q < T_k, left-padded rows (key_start), the model's layout and KV-cache slices; and the
  backward run twice, bitwise equal.
- perf: forward and forward+backward TFLOP/s (triton.testing.do_bench) and peak memory of ours,
  every SDPA backend and the math path; head dims 64 and 128, T 1024 to 8192 at 16,384 tokens per
  batch. Causal FLOPs are half of 4 B nh T^2 hs per forward; the backward counts 2.5 forwards
  (FlashAttention-2, section 4).
- train:<path>: a training step (forward, backward, AdamW) of the GPT-2-small shape in bf16
  autocast, eager then torch.compile'd: ms, tokens/s, MFU against the card's datasheet peak; and
  the compiled model's loss and gradients against eager's on one batch.
- tests: the kernel's and the GPT's tests (pytest), on the card, but for the ahead-of-time compile.

Goals: kernel correct in bf16; fwd+bwd at least 0.8x the best SDPA backend at T=1024, hs=64, and
at least 2x math; memory linear in T; GPT-2-small step at least 45% MFU with compile on an H100.
It needs torch and triton, and the project's model.py, flash_attention.py and common.py.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the benchmark shape for MFU, GPT-2 small (Radford et al. 2019), with our tokenizer's 4096 tokens;
# written out so that this script needs neither tiktoken nor the data
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16)
VOCAB = 4096
TOKENS = 16384  # B * T in the attention sweep: every length does the same work per token
N_HEAD = {64: 16, 128: 8}  # a model width of 1024 either way
PARTS = {"env": 60, "correct": 120, "perf": 150, "train:flash": 200, "tests": 180,
         "train:sdpa": 200, "train:math": 200}  # in order of importance, with time limits (s)
TESTS = ["tests/test_flash_attention.py", "tests/test_flash_gpt.py", "tests/test_model.py"]
TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative error, as in the tests


def bench_ms(fn, dry):
    """Milliseconds per call: do_bench on a card (warmed up, L2 flushed), one timed call dry."""
    if dry:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def peak_mib(fn, dry):
    if dry:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# -----------------------------------------------------------------------------
# the parts, each run as `gpu_check.py --part NAME` in a child process; each adds to `out`,
# which is written to the result file after every measurement, so a timeout keeps what came first

def part_env(out, dry, save):
    import importlib.util

    import triton
    out.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), python=sys.version.split()[0])
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(card=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30),
                   sms=p.multi_processor_count)
    else:
        out["card"] = "none (CPU)"
    out["missing"] = [m for m in ("numpy", "tiktoken", "regex", "tqdm", "pytest")
                      if importlib.util.find_spec(m) is None]
    for key, value in out.items():
        print(f"  {key:11} {value}")


def reference(q, k, v, key_start):
    """float64 attention: causal, queries at the last T_q positions, padding keys hidden from
    every query but their own position."""
    T_q, T_k = q.shape[2], k.shape[2]
    pos, keys = torch.arange(T_k - T_q, T_k, device=q.device)[:, None], torch.arange(T_k, device=q.device)
    keep = keys <= pos
    if key_start is not None:
        keep = keep & (keys >= key_start.view(-1, 1, 1, 1)) | (keys == pos)
    att = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return att.masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()


def make_inputs(B, nh, T_q, T_k, hs, dtype, layout, device, seed=0):
    """q, k, v: contiguous; "model", views of one (B, T, 3 C) tensor as c_attn makes them; "cache",
    k and v the first T_k positions of a longer buffer, as the KV cache hands them over."""
    g = torch.Generator(device).manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)
    if layout == "model":
        q = randn(B, T_q, 3, nh, hs)[:, :, 0].transpose(1, 2)
        kv = randn(B, T_k, 3, nh, hs)
        return q, kv[:, :, 1].transpose(1, 2), kv[:, :, 2].transpose(1, 2)
    if layout == "cache":
        return (randn(B, nh, T_q, hs), *randn(2, B, nh, T_k + 64, hs)[:, :, :, :T_k])
    return randn(B, nh, T_q, hs), randn(B, nh, T_k, hs), randn(B, nh, T_k, hs)


def part_correct(out, dry, save):
    from flash_attention import flash_attention
    from model import attention
    device = "cpu" if dry else "cuda"
    cases = [  # (B, nh, T_q, T_k, hs, layout, first real key per row)
        (2, 8, 1024, 1024, 64, "model", None), (1, 4, 2048, 2048, 128, "contiguous", None),
        (2, 4, 333, 1000, 64, "cache", None), (3, 4, 777, 777, 128, "model", [0, 100, 700]),
        (4, 8, 1, 1000, 64, "cache", [0, 10, 500, 999]), (2, 4, 9, 300, 128, "cache", [3, 290])]
    if dry:
        cases = [(1, 2, 40, 40, 64, "model", None), (2, 1, 9, 50, 64, "cache", [0, 30])]
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for B, nh, T_q, T_k, hs, layout, pad in cases:
            q, k, v = (x.requires_grad_() for x in make_inputs(B, nh, T_q, T_k, hs, dtype, layout, device))
            key_start = None if pad is None else torch.tensor(pad, device=device)
            do = torch.randn_like(q)
            x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
            o64 = reference(*x64, key_start)
            want = [o64, *torch.autograd.grad(o64, x64, do.double())]
            errors = {}
            for name, path in (("ours", "flash"), ("math", "math")):
                o = attention(q, k, v, path, key_start=key_start)
                got = [o, *torch.autograd.grad(o, (q, k, v), do)]
                errors[name] = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
            # the kernel rounds less than the math path in the same dtype (fp32 accumulators)
            bound = max(TOL[dtype], 2 * max(errors["math"]))
            worst = max(worst, max(errors["ours"]) / bound)
            print(f"  {str(dtype)[6:]:8} B={B} nh={nh} T_q={T_q:4} T_k={T_k:4} hs={hs:3} {layout:10} "
                  f"pad={pad}: o dq dk dv " + " ".join(f"{e:.1e}" for e in errors["ours"])
                  + f" | math in {str(dtype)[6:]} {max(errors['math']):.1e}")
            out["worst_error_over_bound"] = worst
            save()
    shape, dtype = ((1, 2, 80, 80, 64), torch.float16) if dry else ((2, 8, 1024, 1024, 64), torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in make_inputs(*shape, dtype, "model", device))
    do = torch.randn_like(q)
    runs = [torch.autograd.grad(flash_attention(q, k, v), (q, k, v), do) for _ in range(2)]
    out["deterministic"] = all(torch.equal(a, b) for a, b in zip(*runs))
    out["correct"] = worst <= 1 and out["deterministic"]
    print(f"  backward bitwise deterministic: {out['deterministic']} | worst error / bound {worst:.2f}")


def attention_paths():
    """name -> f(q, k, v): every way to compute causal attention on (B, nh, T, hs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flash_attention import flash_attention
    from model import attention
    paths = {"ours": flash_attention}
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        paths[name] = sdpa
    paths["math"] = lambda q, k, v: attention(q, k, v, "math")
    return paths


def part_perf(out, dry, save):
    device, tokens, n_head = ("cpu", 64, {64: 2}) if dry else ("cuda", TOKENS, N_HEAD)
    head_dims, lengths = ((64,), (32, 64)) if dry else ((64, 128), (1024, 2048, 4096, 8192))
    print(f"  {'hs':>3} {'T':>5} {'path':>14} | {'fwd ms':>8} {'TFLOP/s':>7} | {'fwd+bwd ms':>10} "
          f"{'TFLOP/s':>7} | {'peak MiB':>8}")
    for hs in head_dims:
        for T in lengths:
            B, nh = tokens // T, n_head[hs]
            flops = 0.5 * 4 * B * nh * T * T * hs  # causal: half the score matrix
            q, k, v = (x.requires_grad_() for x in make_inputs(B, nh, T, T, hs, torch.bfloat16, "contiguous", device))
            do = torch.randn_like(q)
            for name, fn in attention_paths().items():
                line = f"  {hs:3} {T:5} {name:>14} |"
                try:
                    fn(q, k, v)  # first call: compiles and tunes
                    fwd = bench_ms(lambda: fn(q, k, v), dry)
                    both = bench_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), dry)
                    mib = peak_mib(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), dry)
                except RuntimeError as e:  # an SDPA backend that does not take this input, or OOM
                    print(f"{line} unavailable: {str(e).splitlines()[0][:90]}")
                    torch.cuda.empty_cache()
                    continue
                out[f"{hs}/{T}/{name}"] = dict(fwd_ms=fwd, fwd_bwd_ms=both, peak_mib=mib)
                save()
                print(f"{line} {fwd:8.3f} {flops / fwd / 1e9:7.1f} | {both:10.3f} "
                      f"{3.5 * flops / both / 1e9:7.1f} | {mib:8.0f}")


def part_train(out, dry, save, path, compile_too):
    from common import peak_flops, setup_device, synchronize
    from model import GPT, GPTConfig
    device, autocast = setup_device("cpu" if dry else "cuda")
    p = dict(n_layer=1, n_head=2, n_embd=128, block_size=32, batch_size=2) if dry else GPT2_SMALL
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{n: p[n] for n in ("n_layer", "n_head", "n_embd", "block_size")},
                          vocab_size=VOCAB, attn=path)).to(device)
    opt = model.configure_optimizers(6e-4, 0.1, (0.9, 0.95), device.type)
    x = torch.randint(0, VOCAB, (p["batch_size"], p["block_size"]), device=device)
    y = torch.randint(0, VOCAB, (p["batch_size"], p["block_size"]), device=device)
    flops, (peak, peak_source) = model.flops_per_token(p["block_size"]), peak_flops(device)
    steps = 1 if dry else 10

    def loss_and_grads(m):
        with autocast:
            loss = m(x, y)[1]
        return loss.float(), torch.autograd.grad(loss, list(model.parameters()))

    def step(m):
        with autocast:
            loss = m(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(m, mode):
        start = time.perf_counter()
        step(m)  # the first step times the kernel's launch configs; compiled, it recompiles
        # for the optimizer's step, if at all
        synchronize(device)
        first = time.perf_counter() - start
        step(m)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(m)
        synchronize(device)
        ms = (time.perf_counter() - start) * 1e3 / steps
        tok_s = p["batch_size"] * p["block_size"] / ms * 1e3
        out[mode] = dict(ms=ms, tok_s=tok_s, mfu=flops * tok_s / peak, first_step_s=first)
        save()
        print(f"  {path:5} {mode:8} {ms:8.1f} ms/step | {tok_s:10,.0f} tok/s | mfu {100 * flops * tok_s / peak:5.1f}% "
              f"| first step {first:.1f} s")

    print(f"  GPT n_layer={p['n_layer']} n_embd={p['n_embd']} block={p['block_size']} "
          f"batch={p['batch_size']} vocab={VOCAB}, {path} attention; MFU over {peak / 1e12:.1f} TFLOP/s "
          f"({peak_source})")
    compiled = torch.compile(model) if compile_too else None
    if compile_too:  # at the initial weights, before any step moves them
        loss, grads = loss_and_grads(model)
        start = time.perf_counter()
        loss_c, grads_c = loss_and_grads(compiled)  # compiles the forward and the backward
        out["compile_s"] = time.perf_counter() - start
        out["loss_rel_diff"] = abs(loss_c.item() - loss.item()) / abs(loss.item())
        out["grad_rel_diff"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                   for a, b in zip(grads_c, grads))
        print(f"  compiled in {out['compile_s']:.0f} s; against eager: loss {out['loss_rel_diff']:.1e}, "
              f"worst gradient {out['grad_rel_diff']:.1e} (relative)")
        save()
    timed(model, "eager")
    if compile_too:
        timed(compiled, "compiled")


# -----------------------------------------------------------------------------
# the driver: one child process per part, the summary at the end

def run_part(name, args, limit, result_file):
    """Run a part in its own process group, echo its output, kill it at the limit.
    Returns (status, last lines of its output)."""
    env = dict(os.environ)
    if args.dry:
        env["TRITON_INTERPRET"] = "1"
    if name == "tests":
        # every launch config runs on the card there; the ahead-of-time compile needs no card
        cmd = [sys.executable, "-m", "pytest", "-q", "-k", "not compiles_for_a100_and_h100", *TESTS]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", result_file]
        cmd += ["--dry"] * args.dry + ["--no_compile"] * args.no_compile
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    tail = []

    def pump():
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail[:] = (tail + [line])[-20:]
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the part and whatever it started (pytest's compile workers)
        proc.wait()
        status = f"timed out after {limit:.0f} s"
    reader.join(timeout=5)
    return status, tail


def summarize(results, statuses, dry):
    print("\n" + "=" * 100 + "\nsummary")
    for name, status in statuses.items():
        print(f"  {name:12} {status}")
    env, correct, perf = results.get("env", {}), results.get("correct", {}), results.get("perf", {})
    print(f"  card: {env.get('card', 'none')} | torch {env.get('torch')} | triton {env.get('triton')}"
          + (f" | missing packages: {env['missing']}" if env.get("missing") else ""))
    goals = []  # (goal, what was measured, met, about speed)
    if "correct" in correct:
        goals.append(("kernel correct in bf16/fp16 vs float64, deterministic backward",
                      f"worst error / bound {correct['worst_error_over_bound']:.2f}, "
                      f"deterministic {correct['deterministic']}", correct["correct"], False))
    hs, T = (64, 32) if dry else (64, 1024)
    ours = perf.get(f"{hs}/{T}/ours", {}).get("fwd_bwd_ms")
    sdpa = {n: perf[f"{hs}/{T}/{n}"]["fwd_bwd_ms"] for n in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
            if f"{hs}/{T}/{n}" in perf}
    if ours and sdpa:
        best = min(sdpa, key=sdpa.get)
        goals.append((f"fwd+bwd >= 0.8x best SDPA (T={T}, hs={hs})", f"{sdpa[best] / ours:.2f}x of {best}",
                      sdpa[best] / ours >= 0.8, True))
    if ours and f"{hs}/{T}/math" in perf:
        speedup = perf[f"{hs}/{T}/math"]["fwd_bwd_ms"] / ours
        goals.append((f"fwd+bwd >= 2x math (T={T}, hs={hs})", f"{speedup:.2f}x", speedup >= 2, True))
    lengths = sorted({int(k.split("/")[1]) for k in perf if k.startswith(f"{hs}/")})
    growth = {n: perf[f"{hs}/{lengths[-1]}/{n}"]["peak_mib"] / perf[f"{hs}/{lengths[0]}/{n}"]["peak_mib"]
              for n in ("ours", "math") if len(lengths) > 1 and all(f"{hs}/{t}/{n}" in perf for t in lengths)}
    if "ours" in growth and not math.isnan(growth["ours"]):  # same tokens at every T: flat is linear
        goals.append((f"memory linear in T (peak at T={lengths[-1]} / T={lengths[0]}, same tokens)",
                      f"ours {growth['ours']:.2f}x, math {growth.get('math', float('nan')):.2f}x",
                      growth["ours"] <= 1.25, True))
    flash = results.get("train:flash", {})
    if "compiled" in flash:
        goals.append(("GPT-2-small step >= 45% MFU, compiled (the goal is for an H100)",
                      f"{100 * flash['compiled']['mfu']:.1f}% on {env.get('card', '?')}",
                      flash["compiled"]["mfu"] >= 0.45, True))
    for path in ("flash", "sdpa", "math"):
        r = results.get(f"train:{path}", {})
        if "grad_rel_diff" in r:
            goals.append((f"compiled matches eager, {path} (loss, worst gradient)",
                          f"{r['loss_rel_diff']:.1e}, {r['grad_rel_diff']:.1e}",
                          r["loss_rel_diff"] < 1e-2 and r["grad_rel_diff"] < 5e-2, False))
    if "tests" in results:
        goals.append(("the kernel's and the GPT's tests, on the card", results["tests"]["line"],
                      results["tests"]["passed"], False))
    goals = [(goal, measured, ok, speed and dry) for goal, measured, ok, speed in goals]
    for goal, measured, ok, moot in goals:  # a dry run's speeds say nothing about any card
        print(f"  {'dry ' if moot else 'PASS' if ok else 'FAIL'}  {goal:68} {measured}")
    for path in ("flash", "sdpa", "math"):
        for mode, r in results.get(f"train:{path}", {}).items():
            if isinstance(r, dict):
                print(f"  train {path:5} {mode:8} {r['ms']:8.1f} ms/step {r['tok_s']:10,.0f} tok/s "
                      f"mfu {100 * r['mfu']:5.1f}%")
    return all(ok or moot for _, _, ok, moot in goals)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=None, choices=list(PARTS),
                        help="which parts, in the given order (default: all; --dry: all but tests)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all parts together")
    parser.add_argument("--dry", action="store_true", help="on CPU: tiny sizes, Triton's interpreter")
    parser.add_argument("--no_compile", action="store_true", help="train parts: eager only")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # the child process's own part
    parser.add_argument("--result", help=argparse.SUPPRESS)  # where the child writes what it measured
    args = parser.parse_args()
    if args.part:  # a child: run one part, saving what it has after every measurement
        out = {}

        def save():
            with open(args.result, "w") as f:
                json.dump(out, f)
        name, _, path = args.part.partition(":")
        if name == "train":
            part_train(out, args.dry, save, path, not args.no_compile)
        else:
            globals()[f"part_{name}"](out, args.dry, save)
        save()
        return
    if not args.dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or add --dry to check the script on CPU")
    parts = args.parts or [p for p in PARTS if not (args.dry and p == "tests")]
    start, results, statuses = time.time(), {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in parts:
            left = args.budget - (time.time() - start)
            if left < 20:
                statuses[name] = "not run: budget spent"
                continue
            limit = min(PARTS[name], left)
            print(f"\n=== {name} (at most {limit:.0f} s) " + "=" * 60, flush=True)
            result_file = os.path.join(tmp, name.replace(":", "_") + ".json")
            t0 = time.time()
            status, tail = run_part(name, args, limit, result_file)
            statuses[name] = f"{status}, {time.time() - t0:.0f} s"
            if os.path.exists(result_file):
                with open(result_file) as f:
                    results[name] = json.load(f)
            if name == "tests":
                line = next((ln.strip() for ln in reversed(tail) if re.search(r"\d+ (passed|failed|error)", ln)),
                            "no pytest summary")
                results["tests"] = dict(line=line, passed=status == "ok")
    ok = summarize(results, statuses, args.dry)
    if args.dry:
        print("  (dry run: CPU sizes under Triton's interpreter, a check of this script, not of a card)")
    sys.exit(0 if ok and all(s.startswith("ok") for s in statuses.values()) else 1)


if __name__ == "__main__":
    main()
