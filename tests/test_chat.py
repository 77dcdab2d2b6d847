"""chat.py as its users run it, on tiny checkpoints: the terminal through stdin, one-shot, side by side with the
reward models' and the gold judge's notes, clear errors, the web server and its page in a headless browser."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from chat import check_setting, fit_conversation, segments
from data import ASSISTANT, CALL, EOT, USER, encode_chat, encode_conversation
from model import GPT, GPTConfig, save_checkpoint
from tasks import RULES, prompt_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_path, enc):
    """A run folder as the pipeline lays it out, with untrained tiny models of every stage."""
    root = tmp_path_factory.mktemp("chat")
    shutil.copy(tokenizer_path, root / "tokenizer.json")
    shape = dict(block_size=256, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    for stage, n_scores, path in (("pretrain", 0, "pretrain_domain/ckpt.pt"), ("sft", 0, "sft/ckpt.pt"),
                                  ("ppo", 0, "ppo/ckpt.pt"), ("reward", 1, "reward/reward.pt"),
                                  ("rules", len(RULES), "reward/rules.pt")):
        (root / path).parent.mkdir(exist_ok=True)
        save_checkpoint(root / path, GPT(GPTConfig(**shape, n_scores=n_scores)), stage, enc, rules=list(RULES))
    return root


def chat(*args, stdin=""):
    return subprocess.run([sys.executable, "chat.py", "--no_tools", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_a_scripted_terminal_conversation(world, enc):
    r = chat(world / "sft", "--stats", "--temperature", "0", stdin="hello there\n/max_tokens 12\nand again\n"
             "/top_p 7\n/reset\nhi\n")
    assert r.returncode == 0, r.stderr
    assert "(max_tokens = 12)" in r.stderr and "(new conversation)" in r.stderr
    assert "top_p must be a number in [0.0, 1.0]" in r.stderr  # a bad setting is refused, the chat goes on
    turns = [tuple(map(int, t)) for t in re.findall(r"context (\d+) tokens \| (\d+) new", r.stdout)]
    assert len(turns) == 3
    assert turns[0][0] == len(encode_chat(enc, "hello there")[0])
    assert turns[1][0] > turns[0][0] + turns[0][1]  # the second turn sees the first: request, answer and all
    assert turns[1][1] <= 12  # the settings command took effect
    assert turns[2][0] == len(encode_chat(enc, "hi")[0])  # /reset started over


def test_one_shot_is_clean_and_deterministic(world):
    runs = [chat(world / "sft", "--prompt", "Define `f(x)`: add 3 to `x`.", "--seed", "3", "--max_tokens", "24")
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()  # same seed, same answer
    assert "attention:" not in runs[0].stdout and "parameters" not in runs[0].stdout  # only the answer on stdout


def test_side_by_side_with_notes_and_the_gold_verdict(world, tmp_path):
    out = tmp_path / "examples.json"
    r = chat("--models", world / "pretrain_domain", world / "sft", world / "ppo", "--reward_dir", world / "reward",
             "--best_of", "3", "--prompt", "hello", "--task", "test:3", "--json", out, "--max_tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "--- sft" in r.stdout and "--- best-of-3 (sft)" in r.stdout and "gold " in r.stdout
    requests = json.loads(out.read_text())["requests"]
    assert [q["task"] for q in requests] == [None, "test:3"]
    assert requests[1]["request"] == prompt_set("test", 4, 1337)[3].prompt
    for q in requests:
        assert [a["model"] for a in q["answers"]] == ["pretrain_domain", "sft", "ppo", "best-of-3 (sft)"]
        for a in q["answers"]:
            assert isinstance(a["reward"], float) and set(a["rules"]) == set(RULES)
            assert all(0 <= p <= 1 for p in a["rules"].values()) and "ttft_s" not in a
            assert ("gold" in a) == (q["task"] is not None)
    for a in requests[1]["answers"]:
        assert a["gold"]["result"] in ("pass", "fail", "error", "timeout") and isinstance(a["gold"]["utility"], float)
    assert "code" in requests[1]["answers"][0] and requests[1]["answers"][3]["picked"] in range(3)


def test_dropping_old_turns_keeps_the_chat_format(enc):
    history = [(f"request {i}", f"answer {i} {CALL}calc: {i} + 2<|/call|><|result|>{i + 2}<|/result|> so {i + 2}")
               for i in range(30)]
    tokens, dropped = fit_conversation(enc, history, "the last request", 128, 32)
    assert 0 < dropped < 30 and len(tokens) + 32 <= 128
    assert tokens[:2] == [enc.encode_single_token(EOT), enc.encode_single_token(USER)]
    assert tokens[-1] == enc.encode_single_token(ASSISTANT)
    kept = [(q, segments(a)) for q, a in history[dropped:]]
    assert tokens == encode_conversation(enc, kept + [("the last request", None)])[0]  # whole turns, oldest gone
    assert enc.encode_single_token(CALL) in tokens  # tool calls in past answers are special tokens again
    assert fit_conversation(enc, history[dropped - 1:], "the last request", 128, 32)[1] == 1  # no room for more
    assert fit_conversation(enc, [], "word " * 200, 128, 32) == (None, 0)


def test_clear_errors(world):
    for args, words in (((world / "reward",), "--reward_dir"), ((world / "reward" / "rules.pt",), "--reward_dir"),
                        ((world / "nothing",), "not found")):
        r = chat(*args, "--prompt", "hi")
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def server(world):
    proc = subprocess.Popen([sys.executable, "chat.py", "--no_tools", "--models", world / "sft", world / "ppo",
                             "--reward_dir", world / "reward", "--serve", "--port", "0", "--max_tokens", "8"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, line
    yield re.search(r"http://\S+/", line)[0]
    proc.terminate()
    proc.wait(timeout=30)


def post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "api/chat", data=data), timeout=120) as r:
            return r.status, [json.loads(line) for line in r.read().decode().splitlines()]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_streams_answers_and_refuses_bad_requests(server):
    with urllib.request.urlopen(server, timeout=30) as r:
        assert r.status == 200 and b"<html" in r.read()
    status, events = post(server, {"request": "hello", "temperature": 0.5})
    assert status == 200 and any("text" in e for e in events)
    done = {e["model"]: e["done"] for e in events if "done" in e}
    assert set(done) == {"sft", "ppo"} and all("reward" in d and d["tokens"] <= 8 for d in done.values())
    for name, d in done.items():  # the pieces streamed one token at a time make up the answer, split characters too
        assert "".join(e["text"] for e in events if e.get("model") == name and "text" in e) == d["text"]
    for body, code in ((b"{not json", 400), (b"x" * 100_000, 413), ({"request": "hi", "models": ["gpt5"]}, 400),
                       ({"request": "hi", "colour": 1}, 400), ({"request": "hi", "temperature": 9}, 400),
                       ({"request": "hi", "max_tokens": 10_000}, 400), ({"request": ""}, 400)):
        status, reply = post(server, body)
        assert status == code and reply["error"] and "\n" not in reply["error"], (body, reply)
    status, events = post(server, {"task": {"split": "test", "index": 3}, "models": ["ppo"]})  # still serving
    assert status == 200 and [e["done"]["gold"]["result"] for e in events if "done" in e]


def page_when(url, condition, profile, timeout=120):
    """Load url in headless Chromium, driven over its DevTools pipe (commands on fd 3, replies on fd 4), and
    return the page's HTML once the JavaScript condition holds (a streamed answer has no fixed end to wait for)."""
    (cmd_r, cmd_w), (out_r, out_w) = os.pipe(), os.pipe()

    def pipes():  # the child's fd 3 and 4, inheritable
        a, b = os.dup(cmd_r), os.dup(out_w)
        os.dup2(a, 3), os.dup2(b, 4)
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                            preexec_fn=pipes, close_fds=False, stderr=subprocess.DEVNULL)
    os.close(cmd_r), os.close(out_w)
    buf, ids = b"", iter(range(1, 10**6))

    def call(method, session=None, **params):
        nonlocal buf
        i = next(ids)
        message = dict(id=i, method=method, params=params, **({"sessionId": session} if session else {}))
        os.write(cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in buf:
                buf += os.read(out_r, 1 << 20) or pytest.fail("chromium closed its DevTools pipe")
            message, buf = buf.split(b"\0", 1)
            if (reply := json.loads(message)).get("id") == i:
                return reply["result"] if "result" in reply else pytest.fail(f"{method}: {reply}")
    try:
        target = next(t["targetId"] for t in call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        call("Page.navigate", session, url=url)
        deadline = time.time() + timeout
        while not call("Runtime.evaluate", session, expression=condition)["result"].get("value"):
            assert time.time() < deadline, "the page never got there"
            time.sleep(0.2)
        return call("Runtime.evaluate", session, expression="document.documentElement.outerHTML")["result"]["value"]
    finally:
        proc.kill()
        proc.wait()
        os.close(cmd_w), os.close(out_r)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to load the page in")
def test_the_page_streams_an_answer_in_headless_chromium(server, tmp_path):
    html = page_when(server + "?q=hello%20there", "document.querySelectorAll('.col.done').length == 2", tmp_path)
    cols = re.findall(r'<div class="col done"><h3>(\w+)</h3><pre>(.*?)</pre>', html, re.S)
    assert [name for name, _ in cols] == ["sft", "ppo"] and all(text.strip() for _, text in cols)
    assert "hello there" in html and "reward" in html


def test_settings_are_checked_by_value_not_by_assert():
    """Flags, terminal commands and the web API share one check, written without assert (python -O keeps it)."""
    assert check_setting("temperature", "0.7") == 0.7 and check_setting("top_k", 5) == 5
    for name, value in (("max_tokens", 2.5), ("temperature", True), ("top_p", "x"), ("temperature", 99),
                        ("temperature", float("nan")), ("max_tokens", None)):
        with pytest.raises(ValueError, match=f"{name} must be"):
            check_setting(name, value)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        check_setting("max_tokens", 9, max_tokens_cap=8)
    optimized = subprocess.run([sys.executable, "-O", "-c", "import chat; chat.check_setting('temperature', 99)"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert optimized.returncode != 0 and "temperature must be" in optimized.stderr
