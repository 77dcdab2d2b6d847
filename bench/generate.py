"""
Generation speed: batched sampling with the KV cache (model.generate) against recomputing the
whole sequence at every step, on the same model, prompts and number of new tokens.

    python bench/generate.py                              # the cpu preset's shape, 64 prompts
    python bench/generate.py --batch 1 --new_tokens 128   # one sequence
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig  # noqa: E402
from common import setup_device, synchronize  # noqa: E402


@torch.no_grad()
def recompute(model, prompts, new_tokens):
    """The slow way: every step runs the whole (growing) sequence through the model."""
    seq = prompts
    for _ in range(new_tokens):
        logits = model(seq)[0][:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.size(1):]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n_head", type=int, default=4, help="attention heads")
    parser.add_argument("--n_embd", type=int, default=128, help="residual channels")
    parser.add_argument("--vocab_size", type=int, default=4096, help="vocabulary")
    parser.add_argument("--batch", type=int, default=64, help="prompts generated together")
    parser.add_argument("--prompt_len", type=int, default=48, help="tokens per prompt")
    parser.add_argument("--new_tokens", type=int, default=96, help="tokens generated per prompt")
    args = parser.parse_args()
    device, autocast = setup_device()
    torch.manual_seed(0)
    config = GPTConfig(block_size=args.prompt_len + args.new_tokens, vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(device).eval()
    prompts = torch.randint(0, args.vocab_size, (args.batch, args.prompt_len), device=device)
    timings = {}
    for name, fn in (("KV cache (model.generate)", lambda: model.generate(prompts.tolist(), args.new_tokens, 0.0)[0]),
                     ("recompute every step", lambda: recompute(model, prompts, args.new_tokens))):
        with autocast:
            fn()  # warm-up
            synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            synchronize(device)
        timings[name] = time.perf_counter() - t0
        print(f"{name:>26}: {timings[name]:7.3f} s | {args.batch * args.new_tokens / timings[name]:9,.0f} tokens/s")
    with autocast:
        same = torch.equal(model.generate(prompts.tolist(), args.new_tokens, 0.0)[0], recompute(model, prompts, args.new_tokens))
    print(f"shape {args.n_layer}x{args.n_embd}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, {device.type}: the cache is {timings['recompute every step'] / timings['KV cache (model.generate)']:.1f}x "
          f"faster; greedy outputs identical: {same}")
