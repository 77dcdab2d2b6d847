"""The smoke test: the whole pipeline with the quick preset, in a temporary directory."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "docs", "pretrain_generic", "pretrain_domain", "pretrain_domain_scratch", "sft", "sft_closed_book",
          "reward", "ppo", "ppo_ptx", "examples")


def test_quick_pipeline_runs_every_stage_and_reports(tmp_path):
    cmd = [sys.executable, "run.py", "--preset", "quick", "--out_dir", str(tmp_path), "--jobs", "3"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in STAGES:
        assert (tmp_path / stage / "summary.json").exists(), stage
    report = (tmp_path / "REPORT.md").read_text()
    for heading in ("## The claims, in miniature", "## Data and tokenizer", "## Pretraining", "## Supervised fine-tuning",
                    "## Grounding", "## Reward models and best-of-n", "## RLHF with PPO", "## Rewards you can verify",
                    "## Dialogue agents", "## What the models write"):
        assert heading in report, heading
    # nothing of this machine's in the report: not the run's folder, the checkout or the home folder
    assert not any(path in report for path in (str(tmp_path), ROOT, os.path.expanduser("~") + "/")), report
    assert all((tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
               for name in ("pretrain", "sft", "reward", "best_of_n", "ppo", "variants"))
    ptx = json.loads((tmp_path / "ppo_ptx" / "summary.json").read_text())
    for stage in ("sft", "ppo", "ppo_ptx"):  # adversarial probing beside over-refusal; follow-ups of every kind
        summary = json.loads((tmp_path / stage / "summary.json").read_text())
        assert {"violated", "over_refused", "split"} <= set(summary["probing"])
        assert set(summary["followups"]["kinds"]) == {"rename", "extend", "fix", "map"}
    assert ptx["ptx_coef"] > 0 and len(ptx["labeler_wins"]) == len(ptx["sampled"]["passed"]) > 0
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # finished stages are skipped
    assert again.returncode == 0 and again.stdout.count("done already") == len(STAGES)


def test_a_stage_left_alone_takes_the_freed_core(tmp_path, monkeypatch):
    import torch

    import run
    from common import follow_core_share
    for name in ("ppo", "ppo_ptx"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    run.share_cores({"ppo": None, "ppo_ptx": None}, str(tmp_path))  # side by side: a core each
    assert [json.loads((tmp_path / n / "threads").read_text()) for n in ("ppo", "ppo_ptx")] == [1, 1]
    run.share_cores({"ppo_ptx": None}, str(tmp_path))  # ppo ended: its neighbour gets both
    assert json.loads((tmp_path / "ppo_ptx" / "threads").read_text()) == 2
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("RUN_THREADS_FILE", str(tmp_path / "ppo" / "threads"))
        follow_core_share()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("RUN_THREADS_FILE", str(tmp_path / "ppo_ptx" / "threads"))
        follow_core_share()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
