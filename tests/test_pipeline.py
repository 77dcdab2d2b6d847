"""The smoke test: the whole pipeline with the quick preset, in a temporary directory."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "pretrain_generic", "pretrain_domain", "pretrain_domain_scratch", "sft", "reward", "ppo", "ppo_ptx")


def test_quick_pipeline_runs_every_stage_and_reports(tmp_path):
    cmd = [sys.executable, "run.py", "--preset", "quick", "--out_dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        assert (tmp_path / stage / "summary.json").exists(), stage
    report = (tmp_path / "REPORT.md").read_text()
    for heading in ("## Data and tokenizer", "## Pretraining", "## Supervised fine-tuning",
                    "## Reward models and best-of-n", "## RLHF with PPO"):
        assert heading in report
    ppo = json.loads((tmp_path / "ppo_ptx" / "summary.json").read_text())
    assert ppo["ptx_coef"] > 0 and 0 <= ppo["win_rate_vs_sft"] <= 1
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # finished stages are skipped
    assert again.returncode == 0 and again.stdout.count("done already") == len(STAGES)
