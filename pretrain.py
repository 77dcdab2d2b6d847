"""
Stages 1 and 2: pretraining, i.e. next-token prediction on a corpus (GPT, Radford et al. 2018).

Stage 1, generic pretraining from scratch on English prose:
    python pretrain.py --data out/data/generic --out_dir out/pretrain_generic
Stage 2, domain pretraining: the generic model trained further on Python source, as Codex
continued GPT-3 on code (Chen et al. 2021) -- the same loop, started from a checkpoint:
    python pretrain.py --data out/data/domain --init_from out/pretrain_generic/ckpt.pt --out_dir out/pretrain_domain
and the baseline that shows what the generic start buys, the same steps from scratch:
    python pretrain.py --data out/data/domain --out_dir out/pretrain_domain_scratch
On a GPU: add --preset gpu (GPT-2 small, block 1024, bf16 autocast, torch.compile, fused attention).

Ctrl-C saves at the end of the current step; the same command resumes from out_dir/ckpt.pt.
The helpers above the main guard (device, schedule, logging, peak FLOPs) serve the later stages too.
"""
import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from data import get_batch, load_tokenizer, load_tokens
from model import GPT, GPTConfig, load_checkpoint, model_from_checkpoint, save_checkpoint

# named sets of defaults; any flag given on the command line wins
PRESETS = {
    "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=256, batch_size=4, total_batch_tokens=1024,
                  max_steps=30, warmup_steps=5, lr=3e-3, eval_interval=10, eval_batches=4, log_interval=5),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, total_batch_tokens=4096,
                max_steps=300, warmup_steps=30, lr=2e-3, eval_interval=50, eval_batches=16, log_interval=10),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, total_batch_tokens=2**17,
                max_steps=1000, warmup_steps=100, lr=6e-4, eval_interval=100, eval_batches=20, log_interval=10),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
# datasheet bf16 dense peaks, for MFU on known GPUs (others are measured)
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def apply_preset(args, presets):
    """Fill every flag left at None from the chosen preset, and print the whole config."""
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    return args


def setup_device(name="auto"):
    """(device, autocast context): cuda, then mps, then cpu; bf16 autocast where supported."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, autocast


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_flops(device):
    """The FLOP/s that MFU divides by: a known GPU's datasheet bf16 peak, otherwise the measured
    rate of a large matmul on this device, the best any model's matmuls could do here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 2048
    a = torch.ones(n, n, device=device, dtype=dtype)  # values do not change a matmul's speed
    b = torch.ones(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):  # the fastest of several trials: the first warms up, others may share the machine
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cosine_lr(step, max_lr, warmup_steps, max_steps, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * max_lr (GPT-3, Brown et al. 2020, sec. B)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def configure_optimizer(model, lr, weight_decay, betas, device):
    """AdamW (Loshchilov & Hutter 2019); weight decay on matrices and embeddings only, never on
    biases and LayerNorm gains, which set scales rather than store features."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def log_metrics(path, **fields):
    """Append one JSON line to the stage's log."""
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")


class StopFlag:
    """Ctrl-C sets a flag instead of raising mid-step, so the loop can save a consistent state
    (after a whole optimizer step) and exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.stop = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("interrupted: saving at the end of this step (Ctrl-C again to abort)")


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--data", default="out/data/generic", help="folder of token files written by data.py")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/pretrain_generic", help="checkpoint, log and summary go here")
    parser.add_argument("--init_from", default=None, help="a pretraining checkpoint to continue from (stage 2); "
                        "default: from scratch")
    # model (from scratch only; a checkpoint brings its own shape)
    parser.add_argument("--n_layer", type=int, default=None, help="transformer blocks")
    parser.add_argument("--n_head", type=int, default=None, help="attention heads per block")
    parser.add_argument("--n_embd", type=int, default=None, help="channels of the residual stream")
    parser.add_argument("--block_size", type=int, default=None, help="context length in tokens")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout on embeddings and residual branches")
    parser.add_argument("--bias", action="store_true", help="biases in Linear and LayerNorm layers (GPT-2 had them)")
    parser.add_argument("--attn", default="auto", choices=["auto", "math", "sdpa", "flash"], help="attention path")
    # optimization
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per micro-step")
    parser.add_argument("--total_batch_tokens", type=int, default=None, help="tokens per optimizer step "
                        "(gradient accumulation makes up the difference)")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    parser.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (beta1 is 0.9)")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    # evaluation and logging
    parser.add_argument("--eval_interval", type=int, default=None, help="steps between validation runs")
    parser.add_argument("--eval_batches", type=int, default=None, help="batches per validation run")
    parser.add_argument("--log_interval", type=int, default=None, help="steps between log lines")
    parser.add_argument("--save_interval", type=int, default=100, help="steps between checkpoints")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--compile", type=int, default=None, help="torch.compile the model (default: on CUDA)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds init and batch sampling")
    args = apply_preset(parser.parse_args(), PRESETS)

    # -----------------------------------------------------------------------------
    # device, dtype
    device, autocast = setup_device(args.device)
    use_compile = device.type == "cuda" if args.compile is None else bool(args.compile)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")

    # -----------------------------------------------------------------------------
    # data
    enc = load_tokenizer(args.tokenizer)
    train_data, val_data = load_tokens(args.data, "train", enc), load_tokens(args.data, "val", enc)
    tokens_per_micro = args.batch_size * args.block_size
    assert args.total_batch_tokens % tokens_per_micro == 0, \
        f"total_batch_tokens {args.total_batch_tokens} must be a multiple of batch_size * block_size = {tokens_per_micro}"
    grad_accum_steps = args.total_batch_tokens // tokens_per_micro
    print(f"data: {len(train_data):,} train / {len(val_data):,} val tokens | {grad_accum_steps} micro-steps "
          f"of {tokens_per_micro:,} tokens per step")

    # -----------------------------------------------------------------------------
    # model: resume this run, continue from another checkpoint, or start from scratch
    torch.manual_seed(args.seed)
    batch_rng = torch.Generator().manual_seed(args.seed)
    start_step, elapsed, resume = 0, 0.0, None
    if os.path.exists(ckpt_path):
        resume = load_checkpoint(ckpt_path, ["pretrain"], enc, device)
        if resume["finished"]:
            print(f"{ckpt_path} finished at step {resume['step']}; delete {args.out_dir} to train again")
            raise SystemExit(0)
        model = model_from_checkpoint(resume, device, attn=args.attn)
        start_step, elapsed = resume["step"], resume["elapsed"]
        batch_rng.set_state(resume["batch_rng"])
        torch.set_rng_state(resume["torch_rng"])
        print(f"resuming {ckpt_path} at step {start_step}")
    elif args.init_from:
        parent = load_checkpoint(args.init_from, ["pretrain"], enc, device)
        model = model_from_checkpoint(parent, device, attn=args.attn, dropout=args.dropout)
        print(f"model shape inherited from {args.init_from}: " +
              " ".join(f"{k}={parent['model_args'][k]}" for k in MODEL_FLAGS))
    else:
        model = GPT(GPTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS}, vocab_size=enc.n_vocab,
                              attn=args.attn)).to(device)
    if model.config.block_size < args.block_size:
        raise ValueError(f"block_size {args.block_size} exceeds the model's {model.config.block_size}")
    print(f"model: {model.num_params() / 1e6:.2f}M parameters (non-embedding: without wpe)")
    raw_model = model  # checkpoints save this one, never the compiled wrapper
    if use_compile:
        model = torch.compile(model)

    # -----------------------------------------------------------------------------
    # optimizer
    optimizer = configure_optimizer(raw_model, args.lr, args.weight_decay, (0.9, args.beta2), device)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])

    # -----------------------------------------------------------------------------
    # evaluation helpers
    @torch.no_grad()
    def val_loss():
        """Mean loss on the same eval_batches windows every time (a fixed seed), so curves from
        different runs on this corpus are directly comparable."""
        model.eval()
        rng = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(args.eval_batches):
            x, y = get_batch(val_data, args.batch_size, args.block_size, rng, device)
            with autocast:
                losses.append(model(x, y)[1].item())
        model.train()
        return sum(losses) / len(losses)

    def save(step, finished):
        save_checkpoint(ckpt_path, raw_model, "pretrain", enc, optimizer=optimizer.state_dict(), step=step,
                        finished=finished, elapsed=elapsed, config=vars(args), batch_rng=batch_rng.get_state(),
                        torch_rng=torch.get_rng_state())

    # -----------------------------------------------------------------------------
    # the loop
    flops_per_step = raw_model.flops_per_token(args.block_size) * args.total_batch_tokens
    peak = peak_flops(device)
    print(f"MFU is model FLOPs ({flops_per_step / args.total_batch_tokens / 1e6:.1f} MFLOP/token) over "
          f"{peak / 1e12:.3f} TFLOP/s peak ({'datasheet' if device.type == 'cuda' else 'measured matmul'})")
    stop = StopFlag()
    progress = tqdm(range(start_step, args.max_steps + 1), initial=start_step, total=args.max_steps + 1,
                    desc=os.path.basename(args.out_dir), dynamic_ncols=True)
    val, step_times = None, []
    for step in progress:
        last_step = step == args.max_steps
        if stop.stop:
            save(step, finished=False)
            print(f"saved {ckpt_path} at step {step}; run the same command to resume")
            raise SystemExit(130)
        if step % args.eval_interval == 0 or last_step:
            val = val_loss()
            log_metrics(log_path, step=step, val_loss=val)
            tqdm.write(f"step {step:5d}/{args.max_steps} | val loss {val:.4f}")
        if step > start_step and (step % args.save_interval == 0 or last_step):
            save(step, finished=last_step)
        if last_step:
            break

        # ---------------- TRAINING SECTION ----------------
        t0 = time.perf_counter()
        for micro_step in range(grad_accum_steps):
            x, y = get_batch(train_data, args.batch_size, args.block_size, batch_rng, device)
            with autocast:
                _, loss = model(x, y)
            (loss / grad_accum_steps).backward()  # the mean over the whole step's tokens
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
        lr = cosine_lr(step, args.lr, args.warmup_steps, args.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.perf_counter() - t0
        elapsed += dt
        if step > start_step:  # the first step after a (re)start pays for warm-up and compilation
            step_times.append(dt)
        tok_per_s = args.total_batch_tokens / dt
        mfu = flops_per_step / dt / peak
        if step % args.log_interval == 0:
            loss_value = loss.item()
            log_metrics(log_path, step=step, loss=loss_value, lr=lr, grad_norm=norm.item(), ms=dt * 1000,
                        tok_per_s=tok_per_s, mfu=mfu)
            tqdm.write(f"step {step:5d}/{args.max_steps} | loss {loss_value:.4f} | lr {lr:.1e} | "
                       f"norm {norm.item():6.3f} | {dt * 1000:7.1f} ms | {tok_per_s:9,.0f} tok/s | mfu {mfu * 100:5.1f}%")

    # -----------------------------------------------------------------------------
    # summary
    median = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    summary = dict(val_loss=val, steps=args.max_steps, tokens=args.max_steps * args.total_batch_tokens,
                   params=raw_model.num_params(), tok_per_s=args.total_batch_tokens / median,
                   mfu=flops_per_step / median / peak, peak_flops=peak, train_seconds=elapsed,
                   device=torch.cuda.get_device_name() if device.type == "cuda" else device.type,
                   init_from=args.init_from)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"done: val loss {val:.4f} | {summary['tok_per_s']:,.0f} tok/s | mfu {summary['mfu'] * 100:.1f}% | "
          f"{elapsed / 60:.1f} min training")
