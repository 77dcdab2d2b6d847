"""
Pretraining throughput for a given model shape: our pretrain.py, run as a user runs it, against a
nanoGPT-style reference loop on the same shape, batch and machine.

nanoGPT itself cannot be fetched offline, so the reference below is a compact re-statement of its
published design (karpathy/nanoGPT, model.py and train.py): GPT-2 blocks with biases, exact GELU,
`F.scaled_dot_product_attention(is_causal=True)`, tied head, AdamW (fused on CUDA), bf16 autocast
on CUDA, memmap batches, clip 1.0. It is the bar our loop must clear, not code we use.

    python data.py                  # once: the tokenizer sets the vocabulary
    python bench/pretrain.py                                         # the cpu preset's shape
    python bench/pretrain.py --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 16   # gpu shape
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import load_tokenizer  # noqa: E402
from common import peak_flops, setup_device, synchronize  # noqa: E402


class RefBlock(nn.Module):
    def __init__(self, C, nh):
        super().__init__()
        self.nh = nh
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, V, T, L, C, nh):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList([RefBlock(C, nh) for _ in range(L)])
        self.ln_f, self.lm_head = nn.LayerNorm(C), nn.Linear(C, V, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def reference_step_seconds(args, vocab, data, device, autocast):
    """Median seconds per step of the reference loop."""
    torch.manual_seed(0)
    model = RefGPT(vocab, args.block_size, args.n_layer, args.n_embd, args.n_head).to(device)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        for _ in range(args.grad_accum):
            ix = np.random.randint(len(data) - args.block_size, size=args.batch_size)
            x = torch.from_numpy(np.stack([data[i:i + args.block_size].astype(np.int64) for i in ix])).to(device)
            y = torch.from_numpy(np.stack([data[i + 1:i + 1 + args.block_size].astype(np.int64) for i in ix])).to(device)
            with autocast:
                loss = model(x, y)
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n_head", type=int, default=4, help="attention heads")
    parser.add_argument("--n_embd", type=int, default=128, help="residual channels")
    parser.add_argument("--block_size", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per micro-step")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-steps per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two loops this many times")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "out", "tokenizer.json"), help="sets the vocabulary")
    parser.add_argument("--compile", type=int, default=None, help="torch.compile both (default: on CUDA)")
    parser.add_argument("--attn", default="auto", choices=["auto", "math", "sdpa", "flash"], help="our attention path")
    args = parser.parse_args()
    device, autocast = setup_device()
    args.compile = device.type == "cuda" if args.compile is None else bool(args.compile)
    enc = load_tokenizer(args.tokenizer)
    tokens = args.batch_size * args.block_size * args.grad_accum

    with tempfile.TemporaryDirectory() as tmp:  # random tokens: throughput does not depend on the text
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        data = np.random.randint(0, enc.n_vocab, size=2_000_000).astype(np.uint16)
        for split in ("train", "val"):
            data.tofile(os.path.join(data_dir, f"{split}.bin"))
        with open(os.path.join(data_dir, "meta.json"), "w") as f:
            json.dump(dict(tokenizer=enc.name, dtype="uint16"), f)
        ours, ref = [], []
        for _ in range(args.rounds):
            out_dir = os.path.join(tmp, f"run{len(ours)}")
            subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), "--data", data_dir, "--tokenizer",
                            args.tokenizer, "--out_dir", out_dir, "--n_layer", str(args.n_layer), "--n_head",
                            str(args.n_head), "--n_embd", str(args.n_embd), "--block_size", str(args.block_size),
                            "--batch_size", str(args.batch_size), "--total_batch_tokens", str(tokens),
                            "--max_steps", str(args.steps), "--eval_interval", str(10 * args.steps),
                            "--eval_batches", "1", "--log_interval", str(10 * args.steps), "--compile", str(int(args.compile)),
                            "--attn", args.attn],
                           check=True, capture_output=True)
            with open(os.path.join(out_dir, "summary.json")) as f:
                ours.append(json.load(f)["tok_per_s"])
            ref.append(tokens / reference_step_seconds(args, enc.n_vocab, data, device, autocast))
    from model import GPT, GPTConfig
    flops = GPT(GPTConfig(block_size=args.block_size, vocab_size=enc.n_vocab, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd)).flops_per_token(args.block_size)
    peak, peak_source = peak_flops(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"shape: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} channels, block {args.block_size}, "
          f"{tokens:,} tokens/step | {name} | peak {peak / 1e12:.3f} TFLOP/s ({peak_source})")
    for label, rates in ((f"ours (pretrain.py, {args.attn})", ours), ("nanoGPT-style reference", ref)):
        best = max(rates)
        print(f"{label:>24}: {best:10,.0f} tok/s (best of {len(rates)}: "
              f"{', '.join(f'{r:,.0f}' for r in rates)}) | mfu {flops * best / peak * 100:5.1f}%")
    print(f"ratio ours / reference: {max(ours) / max(ref):.2f}")
