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
                    "## Adversarial probing (Sparrow)", "## What the models write"):
        assert heading in report, heading
    # nothing of this machine's in the report: not the run's folder, the checkout or the home folder
    assert not any(path in report for path in (str(tmp_path), ROOT, os.path.expanduser("~") + "/")), report
    assert all((tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
               for name in ("pretrain", "sft", "reward", "best_of_n", "ppo", "variants"))
    ptx = json.loads((tmp_path / "ppo_ptx" / "summary.json").read_text())
    for stage in ("sft", "ppo", "ppo_ptx"):  # adversarial probing, beside over-refusal on ordinary requests
        assert {"violated", "over_refused"} <= set(json.loads((tmp_path / stage / "summary.json").read_text())["probing"])
    assert ptx["ptx_coef"] > 0 and len(ptx["labeler_wins"]) == len(ptx["sampled"]["passed"]) > 0
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # finished stages are skipped
    assert again.returncode == 0 and again.stdout.count("done already") == len(STAGES)
