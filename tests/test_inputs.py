"""Bad input never costs a result: flags, checkpoints, tokenizer files, corpora, diverging runs."""
import errno
import json
import os
import pickle
import runpy
import sys

import pytest
import torch

from conftest import run_script
from data import load_tokenizer
from model import GPT, GPTConfig, CheckpointError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_only(script, argv, monkeypatch, capsys):
    """Run a stage script's argument parsing in this process (the heavy work never starts: a bad
    flag exits in argparse). Returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script,flag,value", [
    ("pretrain.py", "--batch_size", "0"), ("pretrain.py", "--block_size", "0"), ("pretrain.py", "--eval_interval", "0"),
    ("pretrain.py", "--save_interval", "0"), ("pretrain.py", "--eval_batches", "0"), ("pretrain.py", "--max_steps", "-5"),
    ("pretrain.py", "--max_steps", "0"), ("pretrain.py", "--grad_clip", "-1"), ("pretrain.py", "--lr", "nan"),
    ("sft.py", "--batch_size", "0"), ("sft.py", "--flaw_rate", "1.5"), ("reward.py", "--k", "0"),
    ("reward.py", "--best_of", "3"), ("ppo.py", "--minibatch", "0"), ("ppo.py", "--clip", "0"),
])
def test_a_bad_flag_is_a_one_line_usage_error(script, flag, value, monkeypatch, capsys):
    code, err = parse_only(script, [flag, value, "--preset", "quick"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert flag in last or flag.lstrip("-") in last, last


def test_help_shows_the_presets_values(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sft.py", "--preset", "quick", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(os.path.join(ROOT, "sft.py"), run_name="__main__")
    text = " ".join(capsys.readouterr().out.split())
    assert "demonstrations per step (default: 16)" in text  # the quick preset's batch size, not None


class RunsCode:
    """A pickle that would run a shell command when unpickled by a trusting loader."""
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CANARY']}",))


def test_loading_a_crafted_checkpoint_runs_no_code(tmp_path, monkeypatch):
    canary = tmp_path / "ran"
    monkeypatch.setenv("CANARY", str(canary))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"stage": "sft", "model_args": {}, "x": RunsCode()}, f)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pt", ["sft"])
    assert not canary.exists()


def test_a_full_disk_while_saving_is_a_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch, enc):
    model = GPT(GPTConfig(block_size=8, vocab_size=enc.n_vocab, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "ckpt.pt", model, "pretrain", enc, step=1)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        save_checkpoint(tmp_path / "ckpt.pt", model, "pretrain", enc, step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"] and load_checkpoint(tmp_path / "ckpt.pt", ["pretrain"])["step"] == 1


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path, enc):
    model = GPT(GPTConfig(block_size=8, vocab_size=enc.n_vocab, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(tmp_path / "ckpt.pt", model, "pretrain", enc)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("content,message", [
    ("", "malformed"), ('{"merged_tokens": ["@@"], "special_tokens": [], "pattern": "x"}', "malformed"),
    ('{"merged_tokens": []}', "malformed"), ('{"merged_tokens": [], "special_tokens": [], "pattern": "x"}', "lacks"),
])
def test_a_bad_tokenizer_file_is_a_clear_error_naming_it(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        load_tokenizer(path)


def test_a_corpus_too_small_for_one_window_fails_at_data_time(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n" * 30)
    status, _ = run_script("data.py", "--out_dir", tmp_path / "out", "--generic_corpus", tmp_path / "tiny.txt",
                           "--domain_corpus", tmp_path / "tiny.txt", "--vocab_size", "300")
    assert isinstance(status, str) and "fewer than one window" in status


def test_a_diverging_run_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_path, enc):
    data = tmp_path / "data"
    data.mkdir()
    tokens = torch.randint(0, 300, (4000,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    for split in ("train", "val"):
        tokens.tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps(dict(tokenizer=enc.name, dtype="uint16")))
    status, _ = run_script("pretrain.py", "--preset", "quick", "--data", data, "--tokenizer", tokenizer_path,
                           "--out_dir", tmp_path / "run", "--n_layer", "1", "--n_embd", "16", "--block_size", "16",
                           "--batch_size", "4", "--total_batch_tokens", "64", "--lr", "1e6", "--max_steps", "30",
                           "--save_interval", "1", "--grad_clip", "0")
    assert isinstance(status, str) and "diverged" in status  # a one-line message, not a traceback
    assert not (tmp_path / "run" / "summary.json").exists()
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt", ["pretrain"])
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
