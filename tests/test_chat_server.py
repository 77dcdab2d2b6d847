"""chat.py --serve: its JSON API as a client calls it (bad requests, other sites, stalled clients, forged tool
results, Ctrl-C while it streams) and its page, chat.html, run in node against a stand-in for the browser's
document, or in headless Chromium where there is one."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from chat import SOCKET_TIMEOUT
from data import encode_conversation, segments
from test_chat import FAKE, ROOT, world  # noqa: F401  (world is a fixture)

NODE, CHROMIUM = shutil.which("node"), shutil.which("chromium") or shutil.which("chromium-browser")


def start(*args):
    """chat.py --serve on a free port: (process, host, port) once it serves."""
    # Ctrl-C as a terminal sends it, even where this suite runs in the background (`cmd &` ignores SIGINT, and a
    # child inherits that): the server must see the signal the test sends
    proc = subprocess.Popen([sys.executable, "chat.py", "--no_tools", "--serve", "--port", "0", *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    host, port = re.search(r"http://\[?([^\]/]+?)\]?:(\d+)/", line).groups()
    return proc, host, int(port)


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    proc, host, port = start("--models", world / "sft", world / "ppo", "--reward_dir", world / "reward", "--best_of",
                             "2", "--max_tokens", "8")
    yield host, port
    proc.terminate()
    proc.wait(timeout=30)


def call(server, path, body=None, **headers):
    """(status, headers, the reply: a JSON object, or a list of the streamed events) as the page would ask."""
    c = http.client.HTTPConnection(*server, timeout=120)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    c.request("GET" if data is None else "POST", path, data, {"Content-Type": "application/json", **headers})
    r = c.getresponse()
    raw = r.read().decode()
    return r.status, r.headers, [json.loads(x) for x in raw.splitlines()] if r.status == 200 and data else raw


def done(events):
    return {e["model"]: e["done"] for e in events if "done" in e}


def test_the_server_streams_answers_and_refuses_bad_requests(server):
    status, headers, page = call(server, "/")
    assert status == 200 and "<html" in page
    status, _, events = call(server, "/api/chat", {"request": "hello", "temperature": 0.5})
    assert status == 200 and any("text" in e for e in events)
    assert set(done(events)) == {"sft", "ppo", "best-of-2 (sft)"} and all(
        "reward" in d and d["tokens"] <= 8 for d in done(events).values())
    for name in ("sft", "ppo"):  # the pieces streamed one token at a time make up the answer
        assert "".join(e.get("text", "") for e in events if e["model"] == name) == done(events)[name]["text"]
    for body, code, words in (
            (b"{not json", 400, "Expecting"), (b"x" * 100_000, 413, "Content-Length"),
            (b"[" * 60_000, 400, "recursion"), (b'{"request": "hi", "max_tokens": 1e400}', 400, "max_tokens must be"),
            ({"request": "hi", "models": []}, 400, "models must"), ({"request": "hi", "models": ["gpt5"]}, 400, "sft"),
            ({"request": "hi", "colour": 1}, 400, "colour"), ({"request": "hi", "temperature": 9}, 400, "temperature"),
            ({"request": "hi", "temperature": "abc"}, 400, "not 'abc'"), ({"request": ""}, 400, "request must be"),
            ({"request": "hi", "max_tokens": 256}, 400, "block leaves room for 2"),  # a 256-token model
            ({"request": "hi", "history": {"sft": [["q", [1, 2]]]}}, 400, "history must"),  # no tokens from a client
            ({"task": {"split": "test", "index": 10**9}}, 400, "INDEX <")):
        status, _, reply = call(server, "/api/chat", body)
        error = json.loads(reply)["error"]
        assert status == code and words in error and "\n" not in error, (body[:40], reply)
    status, _, reply = call(server, "/api/chat", {"request": "hi"}, **{"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(reply)["error"]
    status, _, events = call(server, "/api/chat", {"task": {"split": "test", "index": 3}, "models": ["ppo"]})
    assert status == 200 and set(done(events)) == {"ppo"}  # no best-of column from sft, which was not asked
    assert done(events)["ppo"]["gold"]["result"]


def test_a_forged_tool_result_in_the_history_stays_text(server, enc):
    status, _, events = call(server, "/api/chat", {"request": "hello", "models": ["sft"],
                                                   "history": {"sft": [["q", FAKE]]}})
    as_text = encode_conversation(enc, [("q", [("text", FAKE)]), ("hello", None)])[0]
    assert status == 200 and done(events)["sft"]["context_tokens"] == len(as_text)
    assert len(encode_conversation(enc, [("q", segments(FAKE)), ("hello", None)])[0]) != len(as_text)  # as markers


def test_a_long_history_is_trimmed_in_linear_time(server):
    history = [[f"q{i}", f"answer {i}"] for i in range(2000)]  # about 24 KB: 27 s of the server's CPU once
    t0 = time.perf_counter()
    status, _, events = call(server, "/api/chat", {"request": "hi", "models": ["sft"], "history": {"sft": history}})
    assert status == 200 and any("dropped the" in e.get("note", "") for e in events)
    assert time.perf_counter() - t0 < 10


def test_the_server_answers_only_its_own_page(server, world):  # noqa: F811
    for path, body in (("/", None), ("/api/config", None), ("/api/chat", {"request": "hi"})):
        assert call(server, path, body, Host="evil.example")[0] == 403  # DNS rebinding: another name, same address
        assert call(server, path, body, Origin="http://evil.example")[0] == 403
    status, _, events = call(server, "/api/chat", {"request": "hi", "models": ["ppo"]}, Origin="http://%s:%d" % server)
    assert status == 200 and set(done(events)) == {"ppo"}
    for path in ("/", "/api/config", "/no/such/page"):  # no other site may frame it
        headers = call(server, path)[1]
        assert headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    config = call(server, "/api/config")[2]
    assert str(world) not in config and json.loads(config)["reward"] == "reward"  # no path of the machine


def test_a_stalled_client_gets_a_408(server):
    with socket.create_connection(server, timeout=SOCKET_TIMEOUT + 30) as s:
        s.sendall(f"POST /api/chat HTTP/1.1\r\nHost: {server[0]}:{server[1]}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 100\r\n\r\n{".encode())  # and the other 99 bytes never come
        t0 = time.time()
        reply = s.recv(1 << 16).decode()
    assert reply.startswith("HTTP/1.0 408") and SOCKET_TIMEOUT - 1 < time.time() - t0 < SOCKET_TIMEOUT + 20


def test_ctrl_c_while_an_answer_streams_exits_cleanly(world):  # noqa: F811
    try:  # on ::1 where this machine has IPv6
        host = socket.create_server(("::1", 0), family=socket.AF_INET6).close() or "::1"
    except OSError:
        host = "127.0.0.1"
    proc, _, port = start(world / "sft", world / "ppo", "--host", host, "--max_tokens", "250", "--temperature", "0")
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.request("POST", "/api/chat", json.dumps({"request": "hi"}), {"Content-Type": "application/json"})
    assert json.loads((r := c.getresponse()).readline())["model"] == "sft"  # it streams
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0  # an exit under running threads aborted (134)
    assert b'"done"' not in r.read()  # the answer stopped there, rather than run on to its end first
    assert "Traceback" not in (err := proc.stderr.read()) and "terminate" not in err, err


def page(search="", fetch="url => new Promise(() => {})", then=""):
    """Run chat.html's script in node, with a stand-in for the document and fetch; `then` runs after it and
    prints what the test reads. Every element records what the page wrote into it."""
    script = re.search(r"<script>(.*?)</script>", open(os.path.join(ROOT, "chat.html")).read(), re.S)[1]
    stand_in = """
class El { constructor() { Object.assign(this, {v: '', textContent: '', innerHTML: '', kids: [], parts: {}}); }
  get value() { return this.v; } set value(v) { this.v = String(v); }  // as an input's value: always a string
  appendChild(c) { this.kids.push(c); return c; }
  get lastChild() { return this.kids.at(-1) || this.appendChild(new El()); }
  querySelector(s) { return this.parts[s] ||= new El(); } get classList() { return {add() {}}; }
  get all() { return [this.value, this.textContent, this.innerHTML, ...this.kids.map(k => k.all),
                      ...Object.values(this.parts).map(k => k.all)].join(' '); } }
const els = {}, sent = [], tick = () => new Promise(r => setTimeout(r, 20));
globalThis.document = {getElementById: id => els[id] ||= new El(), createElement: () => new El()};
globalThis.alert = m => sent.push(['alert', m]);
globalThis.location = {search: %s};
const answer = %s;
globalThis.fetch = async (url, o) => { sent.push([url, o && JSON.parse(o.body)]); return answer(url, o); };
const ok = data => ({ok: true, json: async () => data});
const config = ok({models: [{name: 'sft', stage: 'sft'}], splits: ['<b>x</b>'], split: 'test', reward: 'r', best_of: 0,
                   max_body: 2000, settings: {temperature: 0.6, top_k: 50, top_p: 1, max_tokens: 96, seed: 0}});
""" % (json.dumps(search), fetch)
    code = stand_in + script + f"\n(async () => {{ await tick(); {then} }})();\n"
    r = subprocess.run([NODE, "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(NODE is None, reason="no node to run the page's script in")
def test_the_page_escapes_everything_it_shows():
    shown = page(fetch="url => config", then="""console.log(JSON.stringify([
        notes({rules: {'<img src=x onerror=alert(1)>': 0.9}, gold: {result: '"><script>', utility: 1}, tokens: 3}),
        show('<b>hi</b> <|call|>x<|/call|> <|work|>1+<b>2</b><|/work|>'), els.split.innerHTML]));""")
    assert not any(re.search(r"<(img|script|b>)", s) for s in shown), shown
    assert "&lt;img src=x" in shown[0] and '<span class="call">' in shown[1]  # the page's own markup stays
    assert '<span class="work">&#9998; 1+&lt;b&gt;2' in shown[1]  # the working, set apart


@pytest.mark.skipif(NODE is None, reason="no node to run the page's script in")
def test_a_link_fills_the_box_and_never_sends():
    for search in ("?q=delete%20everything", "?task=test:3"):
        sent = page(search, fetch="url => url == '/api/config' ? config : ok({split: 'test', index: 3, prompt: 'P'})",
                    then="console.log(JSON.stringify([sent.map(s => s[0]), els.q.value]))")
        assert "/api/chat" not in sent[0] and sent[1] in ("delete everything", "P"), sent


@pytest.mark.skipif(NODE is None, reason="no node to run the page's script in")
def test_the_page_says_when_the_server_is_gone_and_keeps_what_was_typed():
    sent = page(fetch="url => url == '/api/config' ? config : Promise.reject(new TypeError('Failed to fetch'))",
                then="""els.q.value = 'my long question'; els.temperature.value = ''; els.top_k.value = 'abc';
                        await send(); console.log(JSON.stringify([sent.at(-1)[1], els.q.value, els.log.all]))""")
    body, kept, shown = sent
    assert kept == "my long question" and "no answer from the server" in shown
    assert "temperature" not in body and body["top_k"] == "abc"  # empty: the default; words: the server says why


@pytest.mark.skipif(NODE is None, reason="no node to run the page's script in")
def test_the_page_sends_a_bounded_history():
    sizes = page(fetch="""(url, o) => url == '/api/config' ? config : ({ok: true, body: {getReader: () => {
        let once = 0; return {read: async () => once++ ? {done: true} : {value: new TextEncoder().encode(
        JSON.stringify({model: 'sft', done: {stage: 'sft', text: 'an answer '.repeat(10), tokens: 9}}) + '\\n')}};
        }}})""",
                 then="""for (let i = 0; i < 60; i++) { els.q.value = `request ${i}`; await send(); }
                         console.log(JSON.stringify(sent.slice(1).map(s => JSON.stringify(s[1].history).length)))""")
    assert sizes[10] > sizes[1] and max(sizes) <= 1000  # it grows, up to half the server's limit (max_body 2000)


def page_when(url, condition, profile, timeout=120):
    """Load url in headless Chromium, driven over its DevTools pipe (commands on fd 3, replies on fd 4), and
    return the page's HTML once the JavaScript condition holds (a streamed answer has no fixed end to wait for)."""
    (cmd_r, cmd_w), (out_r, out_w) = os.pipe(), os.pipe()

    def pipes():  # the child's fd 3 and 4, inheritable
        a, b = os.dup(cmd_r), os.dup(out_w)
        os.dup2(a, 3), os.dup2(b, 4)
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                            preexec_fn=pipes, close_fds=False, stderr=subprocess.DEVNULL)
    os.close(cmd_r), os.close(out_w)
    buf, ids = b"", iter(range(1, 10**6))

    def call(method, session=None, **params):
        nonlocal buf
        i = next(ids)
        os.write(cmd_w, json.dumps(dict(id=i, method=method, params=params, **(
            {"sessionId": session} if session else {}))).encode() + b"\0")
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


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian's is not installed here) to load the page in")
def test_the_page_streams_an_answer_in_headless_chromium(server, tmp_path):
    html = page_when(f"http://{server[0]}:{server[1]}/?q=hello%20there", "(window.sent || !document.getElementById("
                     "'q').value || (document.getElementById('send').click(), window.sent = 1), "
                     "document.querySelectorAll('.col.done').length == 3)", tmp_path)
    cols = re.findall(r'<div class="col done"><h3>([\w() -]+)</h3><pre>(.*?)</pre>', html, re.S)
    assert [name for name, _ in cols] == ["sft", "ppo", "best-of-2 (sft)"] and "hello there" in html
