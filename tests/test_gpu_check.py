"""bench/gpu_check.py is for a card's first minutes, where a typo would cost them: here its
CPU-runnable parts run dry (tiny sizes, the kernel under Triton's interpreter), each in its own
process as on the card."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_dry_run_of_every_cpu_part():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry",
                          "--no_compile", "--parts", "env", "correct", "perf", "train:flash"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.split("summary")[-1]
    for part in ("env", "correct", "perf", "train:flash"):
        assert f"{part} " in summary and "ok," in summary.split(part)[1].splitlines()[0], summary
    assert "PASS  kernel correct" in summary and "train flash eager" in summary
