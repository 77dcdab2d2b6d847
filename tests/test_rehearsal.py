"""The rehearsal (run.py --rehearse), reduced to fit the suite. The whole of it runs every stage of the gpu
preset at its shapes, on its corpus, on a CPU (the README's GPU section has its time). Here, the
rehearsal's own commands for the quick preset, in the graph's order, each run in this process (torch
imported once) on a small corpus and documentation index with short answers: every stage with the
rehearsal's flags, bf16 autocast everywhere and pretraining compiled by inductor (which needs gcc), end to
end to the report (its own stage, the last). About 25 s on two cores, 55 s the first time (the compile; inductor caches it)."""
import argparse
import json
import os

import torch

import run
import tools
from conftest import STDLIB, run_script
from data import is_val, prose_of


def test_the_rehearsal_flags_come_last_in_every_stage():
    """Last, so that they win over a stage's own flags (the gpu preset's generic pretraining sets --max_steps)."""
    stages = run.stage_graph(argparse.Namespace(preset="gpu", rehearse=True, extended=True, out_dir="o", jobs=2))
    assert set(run.REHEARSAL) <= {command[0] for _, _, command in stages}
    for name, _, command in stages:
        flags = run.REHEARSAL.get(command[0], [])
        assert command[len(command) - len(flags):] == flags, name


def test_the_quick_rehearsal_runs_every_stage_to_the_report(tmp_path, monkeypatch):
    args = argparse.Namespace(preset="quick", rehearse=True, extended=False, out_dir=str(tmp_path), jobs=1)
    # a small corpus of stdlib modules, two of them in validation, and their documentation index, instead of
    # the whole standard library's (data.py and tools.py on it take half a minute; test_data.py and
    # test_tools.py cover them)
    names = sorted(n for n in os.listdir(STDLIB) if n.endswith(".py"))
    val = sorted((n for n in names if is_val(n)), key=lambda n: -os.path.getsize(os.path.join(STDLIB, n)))[:2]
    sources = [(n, open(os.path.join(STDLIB, n)).read()) for n in [n for n in names if not is_val(n)][:24] + val]
    for kind in ("generic", "domain"):
        (tmp_path / kind).mkdir()
        for name, source in sources:
            (tmp_path / kind / name).write_text(source if kind == "domain" else prose_of(source))
    index = tools.build_index(sources)
    monkeypatch.setattr(tools, "build_index", lambda: index)
    tools.load_index(str(tmp_path / "docs" / "index.json"))  # the docs stage's cache, of the small index
    own = {"data": ["--generic_corpus", tmp_path / "generic", "--domain_corpus", tmp_path / "domain"],
           "examples": ["--max_tokens", "8"], **{name: ["--max_new_tokens", "8"] for name in
                                                 ("sft", "sft_closed_book", "reward", "ppo", "ppo_ptx", "grpo_tests")}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # at these sizes a second thread only waits, and far longer on a shared machine
    try:
        for name, _, command in run.stage_graph(args):
            if name != "docs":
                (tmp_path / name).mkdir(exist_ok=True)  # as run.py's run_stages does
                status, out = run_script(*command, *own.get(name, []))
                assert status in (0, None), (name, out[-3000:])
    finally:
        torch.set_num_threads(threads)
        leaked = torch.is_autocast_enabled("cpu")  # one autocast entered inside itself stays on after both exits
        torch.set_autocast_enabled("cpu", False)  # so that a leak fails this test, not every training test after it
        torch.clear_autocast_cache()
    assert not leaked, "a stage left bf16 autocast on"

    for path in ("pretrain_generic/ckpt.pt", "pretrain_domain/ckpt.pt", "sft/ckpt.pt", "reward/reward.pt",
                 "ppo/ckpt.pt"):
        config = torch.load(tmp_path / path, map_location="cpu", weights_only=True)["config"]
        assert config["dtype"] == "bfloat16" and config.get("compile", 1) == 1, path  # the GPU's paths, forced
    # MFU's peak is the rate of bf16 matmuls, the dtype the model ran in (an fp32 peak made MFU 198% at gpu shapes)
    assert "bfloat16" in json.loads((tmp_path / "pretrain_generic" / "summary.json").read_text())["peak_source"]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "pretrain_domain" / "log.jsonl")]
    assert max(steps) == 2  # a handful of steps, not the preset's
    assert "**A rehearsal**" in (tmp_path / "REPORT.md").read_text()
