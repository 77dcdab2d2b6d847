"""
The built-in world's data, written out in the formats of your own data (data.py, "your own data"), as a
run of the pipeline read it: what the stages trained on, at scale, in the shape sft.py --demos, reward.py
--pairs and ppo.py --prompts read. Read back, the files give the stages' examples token for token
(tests/test_user_data.py).

    python examples/export.py --run_dir out --out_dir out/export

demos.jsonl: sft.py's demonstrations, rebuilt with the flags in sft/ckpt.pt from the same named prompt and
question sets (tasks.prompt_set, tools.question_set), a tool call and its result written in the completion as
the model writes them; pairs.jsonl: reward.py's cached comparisons, a labeler's ranking of K as its
K-choose-2 pairs; prompts.jsonl: ppo.py's rollout prompts, with the flags in ppo/ckpt.pt.
"""
import argparse
import itertools
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write  # noqa: E402
from data import ASSISTANT, load_tokenizer, render_response  # noqa: E402
from tasks import demonstrate, prompt_set  # noqa: E402
from tools import demonstrate_fact, load_index, question_set  # noqa: E402


def stage_flags(run_dir, stage, own):
    """The flags the stage ran with, from its checkpoint (mmap: no weights are read); None, said why, if the
    stage has not run or read a file of yours (own: its flag for one) instead of the world's data."""
    path = os.path.join(run_dir, stage, "ckpt.pt")
    if not os.path.exists(path):
        return print(f"{path} not found: run {stage}.py (or run.py) first to export what it reads")
    cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    if cfg.get(own):
        return print(f"{path} was trained on your own {cfg[own]}: that file is its data")
    return cfg


def export_world(run_dir, out):
    os.makedirs(out, exist_ok=True)

    def write(name, records):
        with atomic_write(os.path.join(out, name), encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"wrote {len(records):,} records to {os.path.join(out, name)}")

    if sft := stage_flags(run_dir, "sft", "demos"):  # as sft.py's data section draws them
        rng = random.Random(sft["seed"])
        demos = [dict(prompt=t.prompt, completion=demonstrate(t, rng, sft["flaw_rate"])[0])
                 for t in prompt_set("sft_train", sft["n_train"], sft["seed"])]
        if sft["n_facts"]:
            docs = load_index(sft["docs_index"])
            demos += [dict(prompt=q.prompt, completion=render_response(demonstrate_fact(docs, q, sft["tools"])))
                      for q in question_set(docs, "sft_train", sft["n_facts"], sft["seed"])]
        write("demos.jsonl", demos)
    cache = os.path.join(run_dir, "reward", "comparisons.json")
    if os.path.exists(cache):  # its texts are the responses as decoded, tool calls and results written out
        enc = load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
        with open(cache) as f:
            comparisons = json.load(f)
        pairs = []
        for c in comparisons:
            seq = c["sequences"][0]  # <|endoftext|> <|user|> prompt <|assistant|> response
            prompt = enc.decode(seq[2:seq.index(enc.encode_single_token(ASSISTANT))])
            pairs += [dict(prompt=prompt, chosen=c["texts"][w], rejected=c["texts"][l])
                      for w, l in itertools.combinations(c["ranking"], 2)]  # earlier in the ranking: preferred
        write("pairs.jsonl", pairs)
    else:
        print(f"{cache} not found: reward.py writes it (the SFT model's samples and the labelers' rankings)")
    if ppo := stage_flags(run_dir, "ppo", "prompts"):
        n = ppo["iterations"] * ppo["rollout_batch"] // ppo["group_size"]
        write("prompts.jsonl", [dict(prompt=t.prompt) for t in prompt_set("ppo_train", n, ppo["seed"])])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="out", help="the run whose data to export (run.py's --out_dir)")
    parser.add_argument("--out_dir", default="out/export", help="demos.jsonl, pairs.jsonl and prompts.jsonl go here")
    args = parser.parse_args()
    export_world(args.run_dir, args.out_dir)
