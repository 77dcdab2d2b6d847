"""Pretraining end to end on a tiny corpus, in subprocesses, as a user runs it."""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

from conftest import run_script
from data import load_tokenizer, prose_of, save_tokenizer, train_bpe
from model import GPT, GPTConfig, CheckpointError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--total_batch_tokens", "128", "--warmup_steps", "5", "--lr", "3e-3", "--eval_batches", "4",
        "--log_interval", "1", "--preset", "quick"]


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """data.py on a small corpus of our own: 30 stdlib modules, their prose and their source."""
    root = tmp_path_factory.mktemp("pre")
    for kind in ("generic", "domain"):
        (root / kind).mkdir()
    for name in sorted(os.listdir(STDLIB))[:60:2]:
        if name.endswith(".py"):
            with open(os.path.join(STDLIB, name)) as f:
                source = f.read()
            (root / "domain" / name).write_text(source)
            (root / "generic" / f"{name}.txt").write_text(prose_of(source) or "empty")
    run("data.py", "--out_dir", str(root), "--generic_corpus", str(root / "generic"),
        "--domain_corpus", str(root / "domain"), "--vocab_size", "400")
    return root


def pretrain(prepared, out_dir, *extra, check=True):
    return run("pretrain.py", *TINY, "--data", str(prepared / "data" / "domain"), "--tokenizer",
               str(prepared / "tokenizer.json"), "--out_dir", str(out_dir), *extra, check=check)


def val_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """One tiny pretraining run of 60 steps, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    pretrain(prepared, out, "--max_steps", "60", "--eval_interval", "30")
    return out


def test_tiny_pretraining_lowers_validation_loss(trained):
    losses = val_losses(trained)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tok_per_s"] > 0 and 0 < summary["mfu"] < 1


def test_init_from_continues_the_parent_and_inherits_its_shape(prepared, trained, tmp_path):
    result = pretrain(prepared, tmp_path / "child", "--max_steps", "1", "--eval_interval", "1",
                      "--init_from", str(trained / "ckpt.pt"), "--n_layer", "3")
    assert "model shape inherited" in result.stdout and "n_layer=1" in result.stdout
    # the child's first validation is the parent's last: same weights, same batches
    assert val_losses(tmp_path / "child")[0] == pytest.approx(val_losses(trained)[-1], abs=1e-6)


def start_and_stop(cmd, log, n_lines, sig):
    """Start a run and send it a signal once its log holds n_lines training lines."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (log.exists() and log.read_text().count('"loss"') >= n_lines):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def test_kill_interrupt_and_resume_equal_an_uninterrupted_run(prepared, tmp_path):
    steps = ["--max_steps", "160", "--eval_interval", "80", "--save_interval", "50"]
    pretrain(prepared, tmp_path / "straight", *steps)
    interrupted = tmp_path / "interrupted"
    cmd = [sys.executable, "pretrain.py", *TINY, "--data", str(prepared / "data" / "domain"), "--tokenizer",
           str(prepared / "tokenizer.json"), "--out_dir", str(interrupted), *steps]
    log = interrupted / "log.jsonl"
    # killed outright after its checkpoint at step 50: the steps logged since are replayed on resume
    assert start_and_stop(cmd, log, 80, signal.SIGKILL) == -signal.SIGKILL
    assert torch.load(interrupted / "ckpt.pt", weights_only=True)["step"] == 50
    # Ctrl-C: saves where it is and exits with 130
    assert start_and_stop(cmd, log, 110, signal.SIGINT) == 130
    stopped = torch.load(interrupted / "ckpt.pt", weights_only=True)
    assert not stopped["finished"] and 80 <= stopped["step"] < 160
    pretrain(prepared, interrupted, *steps)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(interrupted / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 160 and b["finished"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert val_losses(tmp_path / "straight") == val_losses(interrupted)
    train_steps = [[r["step"] for r in map(json.loads, open(folder / "log.jsonl")) if "loss" in r]
                   for folder in (tmp_path / "straight", interrupted)]
    assert train_steps[0] == train_steps[1]  # every step logged once, none repeated after the resume


@pytest.mark.parametrize("extra,message", [
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--init_from", "missing.pt"], "checkpoint not found"),
])
def test_bad_command_lines_are_clear_errors(prepared, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):  # CheckpointError is a ValueError
        run_script("pretrain.py", *TINY, "--data", prepared / "data" / "domain", "--tokenizer",
                   prepared / "tokenizer.json", "--out_dir", tmp_path / "bad", "--max_steps", "1", *extra)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("data.py", "--out_dir", str(tmp_path), "--generic_corpus", str(tmp_path / "empty"),
                 "--domain_corpus", str(tmp_path / "empty"), check=False)
    assert result.returncode != 0 and "has no text" in result.stderr


def tiny_checkpoint(path, tokenizer_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=load_tokenizer(tokenizer_path).n_vocab, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(path, model, "pretrain", load_tokenizer(tokenizer_path), step=1)
    return model


def test_checkpoint_with_another_vocabulary_is_refused(prepared, tmp_path):
    other = tmp_path / "other.json"
    save_tokenizer(other, train_bpe(["some other text entirely"], 270))
    tiny_checkpoint(tmp_path / "ckpt.pt", prepared / "tokenizer.json")
    with pytest.raises(CheckpointError, match="another vocabulary"):
        load_checkpoint(tmp_path / "ckpt.pt", ["pretrain"], load_tokenizer(other))
    result = pretrain(prepared, tmp_path / "run", "--max_steps", "1", "--init_from", str(tmp_path / "ckpt.pt"),
                      "--tokenizer", str(other), check=False)
    assert result.returncode != 0 and "tokenized with" in result.stderr  # the token files disagree first


def test_wrong_stage_and_cut_short_checkpoints_are_refused(prepared, tmp_path):
    path = tmp_path / "ckpt.pt"
    tiny_checkpoint(path, prepared / "tokenizer.json")
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint; this needs"):
        load_checkpoint(path, ["reward"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut short"):
        load_checkpoint(path, ["pretrain"])


def test_a_run_killed_while_saving_keeps_the_previous_checkpoint(prepared, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = tiny_checkpoint(path, prepared / "tokenizer.json")

    def dies_halfway(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, "pretrain", load_tokenizer(prepared / "tokenizer.json"), step=2)
    monkeypatch.undo()
    assert load_checkpoint(path, ["pretrain"])["step"] == 1
