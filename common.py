"""
The few helpers every stage script shares, and nothing else: flags and presets, the device and
its autocast, printing on one rank, the learning-rate schedule, the stop on a diverged loss, the
JSONL log, the Ctrl-C flag, atomic files and the FLOP/s that MFU divides by.

Everything about the GPT lives on the GPT (model.py); everything about judging a policy lives in
the world (tasks.py). What is here is plumbing a stage would otherwise write out identically.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# flags: presets that fill the defaults, so that --help shows what a flag will be


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's value under the chosen preset."""


def parse_args(parser, presets, argv=None):
    """Parse with the chosen preset's values as the defaults: `--preset quick --help` shows the
    quick values, and any flag given on the command line wins. Prints the whole config."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(presets))
    known, _ = pre.parse_known_args(argv)
    parser.set_defaults(**presets[known.preset])
    args = parser.parse_args(argv)
    print0("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    return args


def _bounded(kind, low, inclusive, what, below=math.inf):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive) or value >= below:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value
    return parse


# flag types: a bad value is a one-line usage error naming the flag (exit code 2), never a
# ZeroDivisionError three screens into a run
positive_int = _bounded(int, 1, True, "an integer >= 1")
nonneg_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, "a number > 0")
nonneg_float = _bounded(float, 0.0, True, "a number >= 0")
fraction = _bounded(float, 0.0, True, "in [0, 1)", below=1.0)

# -----------------------------------------------------------------------------
# device


def setup_device(name="auto", dtype="auto"):
    """(device, autocast context): cuda, then mps, then cpu; bf16 autocast where supported (auto),
    or as asked (a CPU can run the GPU's bf16 path, slowly, to test it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, autocast


def setup_distributed(device_name="auto"):
    """Under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE): join the process group, NCCL on
    CUDA and gloo on CPU, and return (rank, world size, this rank's device name). Run plainly:
    (0, 1, device_name), and nothing else changes."""
    if "RANK" not in os.environ:
        return 0, 1, device_name
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device_name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device_name)
    return dist.get_rank(), dist.get_world_size(), "cpu" if not cuda and device_name == "auto" else device_name


def print0(*args, **kwargs):
    """print on one process only: under torchrun, rank 0 (the other ranks would repeat its lines)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def any_rank(flag, world, device):
    """True on every rank when it is True on any (Ctrl-C on one rank stops them all at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# datasheet bf16 dense peaks, for MFU on known GPUs (others are measured)
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device, pinned=None, dtype=None):
    """(the FLOP/s that MFU divides by, where it came from): pinned by a flag; a known GPU's
    datasheet bf16 peak; or the rate of a large matmul in dtype (the run's autocast dtype; default
    bf16 on a GPU, fp32 on a CPU) timed at the start of this run, the best any model's matmuls could
    do here (a CPU with bf16 instructions runs bf16 faster than fp32: an fp32 peak put the bf16
    rehearsal's MFU at 198%). Measured in each run, with the threads it trains on, so that
    nothing is kept outside the run's folder; the fastest of ten trials, so that a busy moment
    lowers the peak (and inflates the MFU) only if it lasts the whole measurement."""
    if pinned:
        return pinned, "pinned by --peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name}, datasheet bf16 peak"
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 4096 if device.type == "cuda" else 2048
    a = torch.ones(n, n, device=device, dtype=dtype)  # values do not change a matmul's speed
    b = torch.ones(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):  # the fastest of several trials: the first warms up, others may share the machine
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, (f"the fastest of 10 {device.type} {n}x{n} {str(dtype).split('.')[-1]} matmuls at "
                             "the start of the run")

# -----------------------------------------------------------------------------
# the training step


def cosine_lr(step, warmup_steps, max_steps, min_ratio=0.1):
    """The learning rate's share of its peak: linear warmup, then cosine decay to min_ratio (GPT-3,
    Brown et al. 2020, sec. B). A share, because each parameter group has its own peak (Muon's)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_finite(grad_norm):
    """Stop the run on a gradient norm that is not finite: the loss diverged, and the optimizer step
    would spread it into the weights. The last checkpoint, saved before, is kept."""
    if not torch.isfinite(grad_norm):
        raise SystemExit(f"stopping: the gradient norm is {grad_norm.item()} (the loss diverged; is the learning "
                         f"rate too high?). Nothing was saved after the last checkpoint, which is kept.")


def log_metrics(path, **fields):
    """Append one JSON line to the stage's log."""
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")


def trim_log(path, key, resume_at):
    """On resume: drop the log lines of the steps the run is about to replay (those at or after the
    checkpoint's step), so that log.jsonl holds every step once."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line).get(key, -1) < resume_at]
        with atomic_write(path) as f:
            f.writelines(kept)


def follow_core_share():
    """Take the cores run.py gives this stage now. Two stages side by side get a core each; when one
    ends, run.py writes the other's new share to the file $RUN_THREADS_FILE names, and the stage, calling
    this between steps, grows into the freed core (torch.set_num_threads), where a stage once kept the
    threads it started with to its end. Outside run.py: nothing."""
    path = os.environ.get("RUN_THREADS_FILE")
    if not path:
        return
    try:
        with open(path) as f:
            threads = int(f.read())
    except (OSError, ValueError):  # not written yet, or mid-replace: the next call reads it
        return
    if threads >= 1 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


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


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding=None):
    """Open a file that is written whole or not at all: into path.tmp, flushed to the disk, then renamed
    over path, so that a run killed mid-write (or a full disk) leaves the old file, or none, never half
    of one. Every file written whole goes through here (the logs grow a line at a time)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # after a failure: no half file left behind
            os.remove(tmp)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)
