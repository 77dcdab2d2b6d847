"""Shared test setup. Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors;
the variable must be set before anything imports triton, so it is set here, first. Below: the
fixtures several test files share (a tiny tokenizer, a tiny reward model taught a preference)."""
import contextlib
import io
import os
import random
import runpy
import signal
import sys
import sysconfig

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# tests import the top-level scripts (model.py, data.py, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import load_tokenizer, prose_of, save_tokenizer, train_bpe  # noqa: E402
from model import last_token_scores  # noqa: E402
from reward import pairwise_loss  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *argv):
    """A stage script run as `python script argv...` runs it, but in this process: a second Python
    would spend longer importing torch than these tiny runs take. Returns (exit status or the
    message it exited with, what it printed); an exception it raises reaches the test."""
    printed, handler, saved_argv, status = io.StringIO(), signal.getsignal(signal.SIGINT), sys.argv, 0
    try:
        sys.argv = [script, *map(str, argv)]
        with contextlib.redirect_stdout(printed):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGINT, handler)  # the script's Ctrl-C flag is its own, not pytest's
    return status, printed.getvalue()


def textwrap_docs():
    """One real module as a tiny corpus: textwrap's source and its prose."""
    with open(os.path.join(STDLIB, "textwrap.py")) as f:
        source = f.read()
    return [source, prose_of(source)]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 400-token BPE trained on textwrap.py: enough for chat-format tests, trained in a blink."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    save_tokenizer(path, train_bpe(textwrap_docs(), 400))
    return path


@pytest.fixture(scope="session")
def enc(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def train_preference(rm, make_pair, steps, pairs_per_step=8, lr=3e-3, seed=0):
    """Teach a reward model a programmatic preference with InstructGPT's pairwise loss:
    make_pair(rng) returns (preferred, other) token lists. Returns the losses."""
    opt = torch.optim.AdamW(rm.parameters(), lr=lr)
    rng, losses = random.Random(seed), []
    for _ in range(steps):
        seqs = [s for _ in range(pairs_per_step) for s in make_pair(rng)]
        r = last_token_scores(rm, seqs, 0)[:, 0]
        loss = torch.stack([pairwise_loss(r[i:i + 2], [0, 1]) for i in range(0, len(seqs), 2)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def preference_trainer():
    return train_preference
