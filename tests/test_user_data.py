"""Your own data (data.read_demos, read_pairs, read_prompts): each format parsed, each malformed line a
clear error naming it, the world exported and read back into exactly what the stages build, and the three
stages end to end on examples/ with tiny checkpoints."""
import glob
import json
import os
import random
import shutil

import pytest

from conftest import STDLIB, run_script, textwrap_docs
from data import (END, DataError, encode_chat, encode_conversation, encode_response, fit_block, read_demos, read_pairs,
                  read_prompts, split_held_out, write_tokens)
from examples.export import export_world
from model import GPT, GPTConfig, save_checkpoint
from tasks import demonstrate, prompt_set
from tools import build_index, demonstrate_fact, question_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TOOL_TEXT = "<|call|>lookup: json.dumps<|/call|><|result|>RES<|/result|>d"  # a tool call, written as the model does


def msg(role, content, **extra):
    return dict(role=role, content=content, **extra)


def write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


def schemas(path):
    """The distinct schemas in a JSON Lines file, each its records' keys and their JSON types: a file that
    datasets.load_dataset("json") reads as its records are (one schema) has exactly one."""
    with open(path, encoding="utf-8") as f:
        return {tuple(sorted((k, type(v).__name__) for k, v in json.loads(line).items())) for line in f if line.strip()}


def test_one_format_per_example_file():
    """TRL trains on each example file loaded by datasets, which gives a file one schema: a file mixing
    {prompt, completion} and {messages} records fails there (every record gets all three, None where absent)."""
    files = {os.path.basename(path): schemas(path) for path in glob.glob(os.path.join(EXAMPLES, "*.jsonl"))}
    assert files == {"demos.jsonl": {(("completion", "str"), ("prompt", "str"))},
                     "conversations.jsonl": {(("messages", "list"),)},
                     "pairs.jsonl": {(("chosen", "str"), ("prompt", "str"), ("rejected", "str"))},
                     "prompts.jsonl": {(("prompt", "str"),)}}


def test_demonstrations_in_both_shapes_multi_turn_tools_and_unicode(tmp_path, enc):
    demos = read_demos(write(tmp_path / "d.jsonl",
                             dict(prompt="Café → ?", completion="Ça coûte 3 € ✓", id=7),  # other fields ignored
                             dict(messages=[msg("system", "Be brief."), msg("user", "a"), msg("assistant", "b"),
                                            msg("user", "c"), msg("assistant", TOOL_TEXT)]),
                             dict(prompt=[msg("user", "x")], completion=[msg("assistant", "y")])))
    assert demos == [[("Café → ?", [("text", "Ça coûte 3 € ✓")])],
                     [("Be brief.\n\na", [("text", "b")]),
                      ("c", [("call", "lookup: json.dumps"), ("result", "RES"), ("text", "d")])],
                     [("x", [("text", "y")])]]
    tokens, mask = encode_conversation(enc, demos[1])  # the loss on every assistant turn, not on the tool's result
    ends = [i for i, t in enumerate(tokens) if t == enc.encode_single_token(END)]
    assert len(ends) == 2 and all(mask[i] for i in ends)
    assert sum(mask) == len(encode_response(enc, "b")[0]) + sum(encode_response(enc, demos[1][1][1])[1])


def test_pairs_and_prompts_as_strings_and_as_conversations(tmp_path, enc):
    pairs = read_pairs(write(tmp_path / "p.jsonl", dict(prompt="q", chosen="good ✓", rejected="bad"),
                             dict(prompt=[msg("user", "q")], chosen=[msg("assistant", "good ✓")],
                                  rejected=[msg("assistant", "bad")])))
    assert pairs == [([("q", [("text", "good ✓")])], [("q", [("text", "bad")])])] * 2
    prompts = read_prompts(write(tmp_path / "q.jsonl", dict(prompt="hi"), dict(prompt="p", completion="ignored"),
                                 dict(prompt=[msg("user", "a"), msg("assistant", "b"), msg("user", "c")])))
    assert prompts == [[("hi", None)], [("p", None)], [("a", [("text", "b")]), ("c", None)]]
    assert encode_conversation(enc, prompts[0])[0] == encode_chat(enc, "hi")[0]  # open after <|assistant|>


GOOD = {read_demos: dict(prompt="p", completion="c"), read_pairs: dict(prompt="p", chosen="a", rejected="b"),
        read_prompts: dict(prompt="p")}
BAD = [(read_demos, "not json", "not JSON"),
       (read_demos, "[1, 2]", "a record is a JSON object"),
       (read_demos, dict(prompt="p"), 'want "prompt" and "completion", two strings or two lists of messages; or "mess'),
       (read_demos, dict(prompt="p", completion=3), "two strings or two lists of messages"),
       (read_demos, dict(messages=[]), "want a non-empty list of messages"),
       (read_demos, dict(messages=[msg("user", "a")]), "ends with the assistant's message"),
       (read_demos, dict(messages=[msg("assistant", "a")]), 'message 1: want {"role": "user"'),
       (read_demos, dict(messages=[msg("user", "a"), msg("robot", "b")]), 'message 2: want {"role": "assistant"'),
       (read_demos, dict(messages=[msg("user", "a"), msg("assistant", 5)]), "message 2: want"),
       (read_demos, dict(messages=[msg("user", "a"), msg("assistant", "b"), msg("system", "c")]), "message 3: want"),
       (read_demos, dict(messages=[msg("user", "a"), msg("assistant", None, tool_calls=[{}])]), "tool_calls are not"),
       (read_demos, dict(messages=[msg("user", "a"), msg("tool", "r")]), "message 2: tool messages"),
       (read_pairs, dict(prompt="p", chosen="a"), 'want "prompt" and "rejected"'),
       (read_pairs, dict(chosen="a", rejected="b"), 'want "prompt" and "chosen"'),
       (read_prompts, dict(text="p"), 'want "prompt", a string or a list of messages'),
       (read_prompts, dict(prompt=[msg("user", "a"), msg("assistant", "b")]), "ends with the user's message")]


@pytest.mark.parametrize("reader, line, expected", BAD)
def test_a_malformed_line_is_an_error_naming_the_file_and_the_line(tmp_path, reader, line, expected):
    path = write(tmp_path / "bad.jsonl", GOOD[reader], "", line)  # the blank line is skipped, but counted
    with pytest.raises(DataError) as e:
        reader(path)
    assert str(e.value).startswith(f"{path}:3: ") and expected in str(e.value), str(e.value)


def test_an_empty_file_or_one_not_in_utf8_is_an_error(tmp_path):
    with pytest.raises(DataError, match="is empty: no records"):
        read_demos(write(tmp_path / "empty.jsonl", "", "  "))
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "p"}\n{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not JSON in UTF-8 \('utf-8' codec can't decode"):
        read_prompts(str(tmp_path / "latin1.jsonl"))


def test_long_records_are_skipped_and_counted_and_a_fixed_share_held_out(capsys):
    assert fit_block(["a", "bbb", "cc"], [1, 3, 2], 2, "f.jsonl") == ["a", "cc"]
    assert "f.jsonl: skipped 1 of 3 records" in capsys.readouterr().out
    with pytest.raises(DataError, match="no record fits"):
        fit_block(["bbb"], [3], 2, "f.jsonl")
    assert split_held_out(list(range(41))) == ([i for i in range(41) if i % 20], [0, 20, 40])


def test_the_exported_world_reads_back_into_what_the_stages_build(tmp_path, monkeypatch, enc, tokenizer_path):
    """A run folder as the pipeline leaves it (the stages' settings in their checkpoints, the reward stage's
    comparisons), exported and read back: the same examples, sequences and prompts token for token."""
    run, tiny = tmp_path / "run", GPT(GPTConfig(block_size=16, vocab_size=enc.n_vocab, n_layer=1, n_head=1, n_embd=8))
    index = build_index([(n, open(os.path.join(STDLIB, n)).read()) for n in ("textwrap.py", "shlex.py", "fnmatch.py")])
    monkeypatch.setattr("examples.export.load_index", lambda path: index)  # a small documentation index, in a blink
    cfg = dict(n_train=30, n_facts=6, flaw_rate=0.5, tools=1, seed=5, docs_index="unused", demos=None)
    for stage, config in (("sft", cfg), ("ppo", dict(iterations=2, rollout_batch=8, group_size=2, seed=5))):
        (run / stage).mkdir(parents=True)
        save_checkpoint(run / stage / "ckpt.pt", tiny, stage, enc, config=config)
    shutil.copy(tokenizer_path, run / "tokenizer.json")
    responses = [[("text", "x = 1")], [("call", "calc: 2 + 2"), ("result", "4"), ("text", "four")], [("text", "é")]]
    records = []
    for prompt in ("Add one.", "Sum ✓"):  # K = 3 responses, as reward.py caches them, and a labeler's ranking
        answers = [encode_response(enc, r)[0] for r in responses]
        records.append(dict(sequences=[encode_chat(enc, prompt)[0] + a for a in answers], ranking=[2, 0, 1],
                            texts=[enc.decode(a[:-1]) for a in answers]))
    (run / "reward").mkdir()
    (run / "reward" / "comparisons.json").write_text(json.dumps(records))
    export_world(str(run), str(tmp_path / "export"))
    for name in ("demos.jsonl", "pairs.jsonl", "prompts.jsonl"):
        assert len(schemas(tmp_path / "export" / name)) == 1, name  # one format per file, as TRL loads them

    rng = random.Random(cfg["seed"])  # sft.py's default data section
    expected = [encode_chat(enc, t.prompt, demonstrate(t, rng, cfg["flaw_rate"])[0])
                for t in prompt_set("sft_train", cfg["n_train"], cfg["seed"])]
    expected += [encode_chat(enc, q.prompt, demonstrate_fact(index, q, cfg["tools"]))  # and its factual ones
                 for q in question_set(index, "sft_train", cfg["n_facts"], cfg["seed"])]
    assert [encode_conversation(enc, c) for c in read_demos(str(tmp_path / "export" / "demos.jsonl"))] == expected
    pairs = read_pairs(str(tmp_path / "export" / "pairs.jsonl"))
    assert [[encode_conversation(enc, c)[0] for c in p] for p in pairs] == [
        [r["sequences"][w], r["sequences"][l]] for r in records for w, l in ((2, 0), (2, 1), (0, 1))]
    assert [encode_conversation(enc, c)[0] for c in read_prompts(str(tmp_path / "export" / "prompts.jsonl"))] == [
        encode_chat(enc, t.prompt)[0] for t in prompt_set("ppo_train", 8, 5)]  # ppo.py's rollout prompts


def test_sft_reward_and_ppo_run_on_the_example(tmp_path, enc, tokenizer_path):
    """The example's commands with the quick preset and tiny overrides, from a tiny random 'pretrained'
    GPT: the reward model learns the preference the pairs make obvious (a summary line) well above chance."""
    save_checkpoint(tmp_path / "pretrain.pt", GPT(GPTConfig(block_size=256, vocab_size=enc.n_vocab, n_layer=1,
                                                            n_head=2, n_embd=32)), "pretrain", enc)
    (tmp_path / "generic").mkdir()
    for split in ("train", "val"):
        write_tokens(enc, [textwrap_docs()[1]] * 2, str(tmp_path / "generic" / f"{split}.bin"))
    (tmp_path / "generic" / "meta.json").write_text(json.dumps(dict(tokenizer=enc.name, dtype="uint16")))

    def stage(script, *flags):
        status, out = run_script(script, "--preset", "quick", "--tokenizer", tokenizer_path, "--device", "cpu",
                                 "--out_dir", tmp_path / script[:-3], *flags)
        assert status in (0, None), (status, out[-2000:])
        with open(tmp_path / script[:-3] / "summary.json") as f:
            return json.load(f), out

    sft_summary, _ = stage("sft.py", "--demos", os.path.join(EXAMPLES, "demos.jsonl"),
                           os.path.join(EXAMPLES, "conversations.jsonl"), "--init_from", str(tmp_path / "pretrain.pt"),
                           "--max_steps", "10", "--max_new_tokens", "8", "--replay_data", str(tmp_path / "generic"))
    assert sft_summary["n_val"] == 3 and sft_summary["n_train"] + sft_summary["n_val"] + sft_summary["n_skipped"] == 44
    logged = [json.loads(line) for line in open(tmp_path / "sft" / "log.jsonl")]
    assert all(r["replay_loss"] > 0 for r in logged if "loss" in r)  # your pretraining text replayed beside the demos
    reward_summary, _ = stage("reward.py", "--pairs", os.path.join(EXAMPLES, "pairs.jsonl"), "--sft",
                              str(tmp_path / "sft" / "ckpt.pt"), "--val_share", "0.25", "--epochs", "10",
                              "--evals_per_epoch", "1", "--lr", "3e-3")
    assert reward_summary["n_val_prompts"] == 10 and reward_summary["val_acc"] >= 0.7, reward_summary  # chance: 0.5
    assert (tmp_path / "reward" / "reward.pt").exists() and not (tmp_path / "reward" / "rules.pt").exists()
    ppo_summary, out = stage("ppo.py", "--prompts", os.path.join(EXAMPLES, "prompts.jsonl"), "--sft",
                             str(tmp_path / "sft" / "ckpt.pt"), "--reward_dir", str(tmp_path / "reward"),
                             "--generic_data", str(tmp_path / "generic"), "--iterations", "2", "--max_new_tokens", "8",
                             "--eval_samples", "2")
    assert "the rule term is off" in out and not ppo_summary["rule_model"]
    assert len(ppo_summary["rm_score"]) == len(ppo_summary["kl"]) == len(ppo_summary["response_len"]) == 2 * 2
    assert "gold judge (pass@1, utility, violations, hack rate)" in ppo_summary["unavailable"]
