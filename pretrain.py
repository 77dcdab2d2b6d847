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
"""
import argparse
import os
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (HelpFormatter, StopFlag, any_rank, check_finite, cosine_lr, fraction, log_metrics, nonneg_float,
                    nonneg_int, parse_args, peak_flops, positive_float, positive_int, print0, setup_device,
                    setup_distributed, synchronize, trim_log, write_json)
from data import SPECIAL_TOKENS, get_batch, load_tokenizer, load_tokens, window_losses
from model import (ATTENTION_PATHS, GPT, GPTConfig, induction_test, load_checkpoint, model_from_checkpoint,
                   save_checkpoint)

# named sets of defaults; any flag given on the command line wins
PRESETS = {
    "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=256, batch_size=4, total_batch_tokens=1024,
                  max_steps=30, warmup_steps=5, lr=3e-3, eval_interval=10, eval_batches=4, log_interval=5),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, total_batch_tokens=4096,
                max_steps=300, warmup_steps=30, lr=6e-3, eval_interval=60, eval_batches=8, log_interval=10),
    # gpu: sized to the installed-packages corpus (data.py --corpus installed, ~20M domain tokens):
    # 25M parameters, 40M tokens, about two epochs of the domain corpus, so validation loss still
    # falls at the end; GPT-2 small (12x768) is bench/gpu_check.py's benchmark shape, not a preset
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=1024, batch_size=32, total_batch_tokens=2**17,
                max_steps=300, warmup_steps=30, lr=1e-3, eval_interval=50, eval_batches=20, log_interval=10),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "rotary", "key_offset", "qk_norm",
               "relu2", "untied_head", "zero_init")
N_FREQUENT = 256  # the induction test also draws from this many of the corpus's most frequent tokens
VAL_SEED = 0  # the validation windows are the same in every run, so curves compare directly


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # I/O
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named set of defaults")
    parser.add_argument("--data", default="out/data/generic", help="folder of token files written by data.py")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="tokenizer file written by data.py")
    parser.add_argument("--out_dir", default="out/pretrain_generic", help="checkpoint, log and summary go here")
    parser.add_argument("--init_from", default=None, help="a pretraining checkpoint to continue from (stage 2); "
                        "default: from scratch")
    # model (from scratch only; a checkpoint brings its own shape)
    parser.add_argument("--n_layer", type=positive_int, help="transformer blocks")
    parser.add_argument("--n_head", type=positive_int, help="attention heads per block")
    parser.add_argument("--n_embd", type=positive_int, help="channels of the residual stream")
    parser.add_argument("--block_size", type=positive_int, help="context length in tokens")
    parser.add_argument("--dropout", type=fraction, default=0.0, help="dropout on embeddings and residual branches")
    parser.add_argument("--bias", action="store_true", help="biases in Linear and LayerNorm layers (GPT-2 had them)")
    parser.add_argument("--attn", default="auto", choices=ATTENTION_PATHS, help="attention path")
    for flag, help_text in (("rotary", "rotary positions instead of learned ones"), ("key_offset", "half of each key "
                            "from the previous position"), ("qk_norm", "RMS-normalized queries and keys"),
                            ("relu2", "ReLU^2 MLP instead of GELU"), ("untied_head", "an output head of its own"),
                            ("zero_init", "residual projections and head start at zero")):
        parser.add_argument(f"--{flag}", type=int, choices=(0, 1), default=int(getattr(GPTConfig, flag)),
                            help=f"{help_text} (model.GPTConfig; bench/ablations.py measures each)")
    # optimization
    parser.add_argument("--batch_size", type=positive_int, help="sequences per micro-step")
    parser.add_argument("--total_batch_tokens", type=positive_int, help="tokens per optimizer step "
                        "(gradient accumulation makes up the difference)")
    parser.add_argument("--max_steps", type=positive_int, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate (AdamW's: every parameter, or with Muon "
                        "the embeddings, head and gains)")
    parser.add_argument("--matrix_lr", type=nonneg_float, default=0.02, help="Muon's peak learning rate for the blocks' "
                        "matrices (Jordan et al. 2024); 0: AdamW for every parameter")
    parser.add_argument("--warmup_steps", type=nonneg_int, help="linear warmup steps")
    parser.add_argument("--weight_decay", type=nonneg_float, default=0.1, help="AdamW weight decay on matrices")
    parser.add_argument("--beta2", type=fraction, default=0.95, help="AdamW beta2 (beta1 is 0.9)")
    parser.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="clip the gradient norm to this (0: off)")
    # data that teaches copying
    parser.add_argument("--copy_share", type=fraction, default=0.25, help="share of windows that carry a random span "
                        "and its repeat (data.insert_repeats)")
    parser.add_argument("--copy_span", type=positive_int, nargs=2, default=(5, 60), metavar=("SHORTEST", "LONGEST"),
                        help="lengths of the repeated spans")
    # evaluation and logging
    parser.add_argument("--eval_interval", type=positive_int, help="steps between validation runs")
    parser.add_argument("--eval_batches", type=positive_int, help="batches per validation run")
    parser.add_argument("--log_interval", type=positive_int, help="steps between log lines")
    parser.add_argument("--save_interval", type=positive_int, default=100, help="steps between checkpoints")
    # system
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="autocast: bf16 where "
                        "the device supports it (auto), or as asked")
    parser.add_argument("--compile", type=int, choices=(0, 1), default=None, help="torch.compile the model "
                        "(default: on CUDA)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds init and batch sampling")
    parser.add_argument("--peak_flops", type=positive_float, default=None, help="the FLOP/s MFU divides by "
                        "(default: a GPU's datasheet peak, or a matmul timed at the start of the run)")
    args = parse_args(parser, PRESETS)

    # -----------------------------------------------------------------------------
    # device, dtype, and under torchrun the ranks (DistributedDataParallel): rank 0 alone prints, logs,
    # evaluates and saves; every rank draws the same batches and trains on its share of them
    rank, world, device_name = setup_distributed(args.device)
    master = rank == 0
    device, autocast = setup_device(device_name, args.dtype)
    use_compile = device.type == "cuda" if args.compile is None else bool(args.compile)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")

    # -----------------------------------------------------------------------------
    # data
    enc = load_tokenizer(args.tokenizer)
    train_data, val_data = load_tokens(args.data, "train", enc), load_tokens(args.data, "val", enc)
    tokens_per_micro = args.batch_size * args.block_size
    if args.total_batch_tokens % tokens_per_micro:
        raise ValueError(f"--total_batch_tokens {args.total_batch_tokens} must be a multiple of batch_size * "
                         f"block_size = {tokens_per_micro} (gradient accumulation takes whole micro-steps)")
    grad_accum_steps = args.total_batch_tokens // tokens_per_micro
    if grad_accum_steps % world:
        raise ValueError(f"{grad_accum_steps} micro-steps per step do not divide among {world} ranks: change "
                         f"--total_batch_tokens or --batch_size")
    n_ordinary = enc.n_vocab - len(SPECIAL_TOKENS)
    repeats = (args.copy_share, *args.copy_span, n_ordinary)
    # the induction test draws from every ordinary token, and from the corpus's most frequent ones, where the
    # model's prior competes hardest with the copy
    counts = np.bincount(train_data[:10_000_000], minlength=enc.n_vocab)[:n_ordinary]
    pools = dict(all=torch.arange(n_ordinary), frequent=torch.from_numpy(np.argsort(-counts)[:N_FREQUENT].copy()))
    print0(f"data: {len(train_data):,} train / {len(val_data):,} val tokens | {grad_accum_steps} micro-steps "
           f"of {tokens_per_micro:,} tokens per step" + (f", {grad_accum_steps // world} on each of {world} ranks"
                                                         if world > 1 else ""))

    # -----------------------------------------------------------------------------
    # model: resume this run, continue from another checkpoint, or start from scratch
    torch.manual_seed(args.seed)
    batch_rng = torch.Generator().manual_seed(args.seed)
    start_step, elapsed, resume = 0, 0.0, None
    if os.path.exists(ckpt_path):
        resume = load_checkpoint(ckpt_path, ["pretrain"], enc, device)
        if resume["finished"]:
            print0(f"{ckpt_path} finished at step {resume['step']}; delete {args.out_dir} to train again")
            raise SystemExit(0)
        model = model_from_checkpoint(resume, device, attn=args.attn)
        start_step, elapsed = resume["step"], resume["elapsed"]
        batch_rng.set_state(resume["batch_rng"])
        torch.set_rng_state(resume["torch_rng"])
        trim_log(log_path, "step", start_step)
        print0(f"resuming {ckpt_path} at step {start_step}")
    elif args.init_from:
        parent = load_checkpoint(args.init_from, ["pretrain"], enc, device)
        model = model_from_checkpoint(parent, device, attn=args.attn, dropout=args.dropout)
        print0(f"model shape inherited from {args.init_from}: " +
               " ".join(f"{k}={parent['model_args'][k]}" for k in MODEL_FLAGS))
    else:
        model = GPT(GPTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS}, vocab_size=enc.n_vocab,
                              attn=args.attn)).to(device)
    if model.config.block_size < args.block_size:
        raise ValueError(f"block_size {args.block_size} exceeds the model's {model.config.block_size}")
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters (non-embedding: without wpe)")
    raw_model = model  # checkpoints save this one, never the compiled or distributed wrapper
    if use_compile:
        model = torch.compile(model)
    if world > 1:  # averages the gradients of all ranks in backward (no buffers to broadcast)
        model = DistributedDataParallel(model, broadcast_buffers=False)

    # -----------------------------------------------------------------------------
    # optimizer
    optimizer = raw_model.configure_optimizers(args.lr, args.weight_decay, (0.9, args.beta2), device.type,
                                               matrix_lr=args.matrix_lr or None)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])

    # -----------------------------------------------------------------------------
    # evaluation helpers
    def val_losses():
        """Loss per batch on the same eval_batches batches of validation windows every time (a fixed seed)."""
        model.eval()
        losses = window_losses(model, val_data, args.eval_batches, args.batch_size, args.block_size, VAL_SEED,
                               autocast)
        model.train()
        return losses

    def save(step, finished):
        save_checkpoint(ckpt_path, raw_model, "pretrain", enc, optimizer=optimizer.state_dict(), step=step,
                        finished=finished, elapsed=elapsed, config=vars(args), batch_rng=batch_rng.get_state(),
                        torch_rng=torch.get_rng_state())

    # -----------------------------------------------------------------------------
    # the loop
    flops_per_step = raw_model.flops_per_token(args.block_size) * args.total_batch_tokens
    peak, peak_source = peak_flops(device, args.peak_flops, getattr(autocast, "fast_dtype", None))  # matmuls' dtype
    print0(f"MFU is model FLOPs ({flops_per_step / args.total_batch_tokens / 1e6:.1f} MFLOP/token) over "
           f"{peak / 1e12:.3f} TFLOP/s peak ({peak_source})")
    stop = StopFlag()
    progress = tqdm(range(start_step, args.max_steps + 1), initial=start_step, total=args.max_steps + 1,
                    desc=os.path.basename(args.out_dir), dynamic_ncols=True, disable=not master)
    val, step_times = None, []
    for step in progress:
        last_step = step == args.max_steps
        if any_rank(stop.stop, world, device):
            if master:
                save(step, finished=False)
            print0(f"saved {ckpt_path} at step {step}; run the same command to resume")
            raise SystemExit(130)
        if master and (step % args.eval_interval == 0 or last_step):
            val_batches = val_losses()
            val = sum(val_batches) / len(val_batches)
            induction = {name: induction_test(raw_model, pool) for name, pool in pools.items()}
            log_metrics(log_path, step=step, val_loss=val, induction=induction)
            tqdm.write(f"step {step:5d}/{args.max_steps} | val loss {val:.4f} | induction test " +
                       " ".join(f"{name} {np.mean(shares):.1%}" for name, shares in induction.items()))
        if master and (last_step or (step > start_step and step % args.save_interval == 0)):
            save(step, finished=last_step)
        if last_step:
            break

        # ---------------- TRAINING SECTION ----------------
        t0 = time.perf_counter()
        for micro_step in range(grad_accum_steps):
            x, y = get_batch(train_data, args.batch_size, args.block_size, batch_rng, device, repeats)
            if micro_step % world != rank:
                continue  # every rank draws every micro-batch (one stream of data), and trains on its share
            # the ranks' gradients are averaged once, on each rank's last micro-step (nanoGPT)
            model.require_backward_grad_sync = micro_step >= grad_accum_steps - world
            with autocast:
                _, loss = model(x, y)
            (loss / (grad_accum_steps // world)).backward()  # the mean over the step's tokens, after DDP's average
        lr_share = cosine_lr(step, args.warmup_steps, args.max_steps)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
        check_finite(norm)  # a diverged loss stops the run here, before the step spreads it into the weights
        for group in optimizer.param_groups:  # each group's own peak (Muon's matrices have theirs) times the schedule
            group["lr"] = group["base_lr"] * lr_share
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.perf_counter() - t0
        elapsed += dt
        if step > start_step:  # the first step after a (re)start pays for warm-up and compilation
            step_times.append(dt)
        tok_per_s = args.total_batch_tokens / dt
        mfu = flops_per_step / dt / (peak * world)  # each rank's device has its own peak
        if master and step % args.log_interval == 0:
            loss_value = loss.item()
            log_metrics(log_path, step=step, loss=loss_value, lr_share=lr_share, grad_norm=norm.item(), ms=dt * 1000,
                        tok_per_s=tok_per_s, mfu=mfu)
            tqdm.write(f"step {step:5d}/{args.max_steps} | loss {loss_value:.4f} | lr x{lr_share:.2f} | "
                       f"norm {norm.item():6.3f} | {dt * 1000:7.1f} ms | {tok_per_s:9,.0f} tok/s | "
                       f"mfu {mfu * 100:5.1f}%")

    # -----------------------------------------------------------------------------
    # summary
    if world > 1:
        torch.distributed.destroy_process_group()
    if not master:
        raise SystemExit(0)
    median = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    summary = dict(val_loss=val, val_losses=val_batches, induction=induction, steps=args.max_steps,
                   tokens=args.max_steps * args.total_batch_tokens,
                   params=raw_model.num_params(), tok_per_s=args.total_batch_tokens / median,
                   mfu=flops_per_step / median / (peak * world), peak_flops=peak, peak_source=peak_source,
                   train_seconds=elapsed, ranks=world, init_from=args.init_from,
                   device=torch.cuda.get_device_name() if device.type == "cuda" else device.type)
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print0(f"done: val loss {val:.4f} | {summary['tok_per_s']:,.0f} tok/s | mfu {summary['mfu'] * 100:.1f}% | "
           f"{elapsed / 60:.1f} min training")
