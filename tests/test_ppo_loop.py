"""The PPO loop end to end, on tiny checkpoints: ppo.py run as a user runs it."""
import json
import os
import random
import shutil

import pytest
import torch

from conftest import run_script, textwrap_docs
from data import encode_chat, write_tokens
from model import GPT, GPTConfig, save_checkpoint
from tasks import make_tasks, prompt_set


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_path, enc, preference_trainer):
    """Tiny checkpoints for every input of ppo.py. The SFT checkpoint has dropout 0.2 in its config,
    which ppo.py must switch off. The reward model is taught a programmatic preference: responses
    containing one of a fixed tenth of the vocabulary score higher."""
    root = tmp_path_factory.mktemp("ppo")
    shutil.copy(tokenizer_path, root / "tokenizer.json")
    (root / "generic").mkdir()
    for split in ("train", "val"):
        write_tokens(enc, [textwrap_docs()[1]] * 4, str(root / "generic" / f"{split}.bin"))
    (root / "generic" / "meta.json").write_text(json.dumps(dict(tokenizer=enc.name, dtype="uint16")))
    shape = dict(block_size=320, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(**shape, dropout=0.2))
    save_checkpoint(root / "sft.pt", policy, "sft", enc, step=0)
    policy.eval()
    prompts = [encode_chat(enc, t.prompt)[0] for t in make_tasks("train", 32, 0)]
    favoured = random.Random(0).sample(range(enc.n_vocab - 4), (enc.n_vocab - 4) // 10)  # a tenth of the tokens
    others = [t for t in range(enc.n_vocab - 4) if t not in favoured]

    def pair(rng):  # a prompt and two responses, the same but for a favoured token in one
        without = [rng.choice(others) for _ in range(8)]
        with_target = list(without)
        with_target[rng.randrange(8)] = rng.choice(favoured)
        prompt = rng.choice(prompts)
        return prompt + with_target, prompt + without

    # the GPT-2 layout learns this bag-of-tokens preference surely in 600 steps, where the modern one
    # (queries and keys of 16 channels normalized, ReLU^2) does on some seeds only
    rm = GPT(GPTConfig(**shape, n_scores=1, rotary=False, key_offset=False, qk_norm=False, relu2=False,
                       untied_head=False, zero_init=False))
    losses = preference_trainer(rm, pair, 600)
    assert sum(losses[-10:]) / 10 < 0.2
    save_checkpoint(root / "reward.pt", rm, "reward", enc)
    save_checkpoint(root / "rules.pt", GPT(GPTConfig(**shape, n_scores=2)), "rules", enc)
    return root


def run_ppo(world, out_dir, *extra):
    status, _ = run_script("ppo.py", "--preset", "quick", "--sft", world / "sft.pt", "--reward_dir", world,
                           "--generic_data", world / "generic", "--tokenizer", world / "tokenizer.json",
                           "--out_dir", out_dir, "--max_new_tokens", "8", "--n_eval", "4", *extra)
    assert status in (0, None), status
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):  # no iterations, no log
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            return [json.loads(line) for line in f]


def test_first_ratio_is_exactly_one_and_first_kl_exactly_zero(world, tmp_path):
    log = run_ppo(world, tmp_path / "run", "--iterations", "2", "--temperature", "0.7", "--ptx_coef", "0.5")
    assert log[0]["first_ratio_dev"] == 0.0 and log[1]["first_ratio_dev"] == 0.0
    assert log[0]["sampler_dev"] < 1e-4 and log[1]["sampler_dev"] < 1e-4  # scored at the temperature it sampled at
    # in 8 tokens the untrained policy rarely ends, and the responses that do not pay the missing-end penalty (1)
    assert log[0]["ended"] < 0.5 and log[0]["score"] == pytest.approx(log[0]["rm_score"] - log[0]["rule_prob"]
                                                                       - (1 - log[0]["ended"]), abs=1e-5)
    assert log[0]["kl"] == 0.0  # the policy starts as the reference
    assert log[1]["kl"] != 0.0 and "ptx_loss" in log[0]


def test_the_value_model_starts_from_the_reward_model(world, tmp_path):
    run_ppo(world, tmp_path / "run", "--iterations", "0")
    value = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["value_model"]
    reward = torch.load(world / "reward.pt", weights_only=True)["model"]
    assert all(torch.equal(value[k], reward[k]) for k in reward)


def test_ppo_raises_a_programmatic_reward(world, tmp_path):
    log = run_ppo(world, tmp_path / "run", "--iterations", "20", "--rollout_batch", "32", "--minibatch", "16",
                  "--ppo_epochs", "4", "--lr", "1e-2", "--beta", "0.0", "--rule_coef", "0", "--missing_end_penalty", "0")
    first, last = sum(r["rm_score"] for r in log[:4]) / 4, sum(r["rm_score"] for r in log[-4:]) / 4
    assert last > first + 2.0, [round(r["rm_score"], 3) for r in log]


@pytest.mark.parametrize("variant", [["--reward", "tests"], ["--reward", "both"],
                                     ["--reward", "tests", "--advantage", "grpo", "--group_size", "4"]])
def test_every_reward_source_and_advantage_runs_the_same_loop(world, tmp_path, variant):
    log = run_ppo(world, tmp_path / "run", "--iterations", "1", "--eval_samples", "2", "--seed", "3", *variant)
    assert len(log) == 1 and log[0]["first_ratio_dev"] == 0.0 and log[0]["kl"] == 0.0
    assert 0.0 <= log[0]["pass_rate"] <= 1.0 and ("explained_var" in log[0]) == ("grpo" not in variant)
    assert ("kl_ref" in log[0]) == ("grpo" in variant)  # GRPO's KL to the reference is in its loss, PPO's in its reward
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reward"] == variant[1] and summary["advantage"] == ("grpo" if "grpo" in variant else "gae")
    assert len(summary["labeler_wins"]) == len(summary["sampled"]["passed"]) == 4 * 2
    judged = json.loads((tmp_path / "run" / "samples_test.json").read_text())  # what the report reads
    assert judged["prompts"] == [t.prompt for t in prompt_set("test", 4, 3)]
