"""Past one device: pretrain.py under torchrun with two gloo processes equals one process with the
same global batch, and only rank 0 writes."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from model import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "quick", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--batch_size", "4", "--total_batch_tokens", "256", "--max_steps", "3", "--eval_interval", "3",
        "--log_interval", "1", "--warmup_steps", "1", "--peak_flops", "1e12"]


def test_two_ranks_train_exactly_as_one_process(tmp_path, tokenizer_path, enc):
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, enc.n_vocab - 8, 5000).astype(np.uint16)
    for split in ("train", "val"):
        tokens.tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps(dict(tokenizer=enc.name, dtype="uint16")))
    args = [*TINY, "--data", str(data), "--tokenizer", str(tokenizer_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "pretrain.py", *args, "--out_dir", str(tmp_path / "one")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "pretrain.py", *args, "--out_dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert "1 on each of 2 ranks" in ranks.stdout and ranks.stdout.count("done: val loss") == 1  # rank 0 speaks
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "log.jsonl", "summary.json"]  # one of each
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]  # every step logged once, by one rank
    for a, b in zip(*logs):  # the same global batch: the same gradient norm and validation loss at every step
        for key in ("grad_norm", "val_loss"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) < 1e-4 * (1 + abs(a.get(key, 0)))
    one, two = (load_checkpoint(tmp_path / run / "ckpt.pt", ["pretrain"]) for run in ("one", "two"))
    for name, weight in one["model"].items():
        torch.testing.assert_close(weight, two["model"][name], rtol=1e-4, atol=1e-5)
