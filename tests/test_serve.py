"""tp-serve: the continuous-batching scheduler in one process (tiny model), then the real server with
SmolLM2 at tp=2 under the real mpirun (one server for the module), the official openai client, every
bad request, disconnects, metrics, and the local launcher; no process is left behind."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from helpers import REPO, build_checkpoint, free_port, tool, tp_run_json
from tp_runtime.convert.pipeline import convert
from tp_runtime.runtime.engine_loop import Event, Scheduler, ServeRequest
from tp_runtime.runtime.sequence import Request
from tp_runtime.runtime.llm import LLM
from tp_runtime.runtime.sampling import SamplingParams

pytestmark = pytest.mark.slow  # servers with their ranks, and HTTP clients

KEY = "test-key-123"
MAX_SEQ_LEN = 256
SERVE = [sys.executable, "-m", "tp_runtime.cli.serve"]


# --- the scheduler, in one process ---

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_checkpoint(str(root / "hf"), seed=3)
    convert(str(root / "hf"), str(root / "tp1"), 1, progress=False)
    llm = LLM(str(root / "tp1"), max_batch_size=3, max_seq_len=64, threads=1)
    yield llm
    llm.close()


def _params(n: int, sampled: bool = False) -> SamplingParams:
    if sampled:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.9, top_k=20, seed=n)
    return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)


def test_scheduler_join_leave_and_block_reuse(tiny_llm):
    llm = tiny_llm
    prompts = [[5, 9, 14], [7] * 11, [3, 30, 60, 90, 11, 12, 13], [40, 41], list(range(10, 26)), [99, 98, 97, 96]]
    lengths = [9, 8, 12, 6, 7, 10]
    sampled = [False, False, True, False, False, True]
    alone = [llm.generate([p], _params(n, s))[0].output_ids for p, n, s in zip(prompts, lengths, sampled, strict=True)]

    sched = Scheduler(llm.model, llm.cache, llm.comm, llm.device, llm.eos_ids, blocks=llm.blocks)
    got = {i: Event() for i in range(len(prompts))}
    holders = {}  # KV-cache block -> the requests that held it

    def submit(i):
        def on_event(ev, i=i):
            got[i].token_ids += ev.token_ids
            got[i].finish_reason = ev.finish_reason or got[i].finish_reason
        sched.submit(ServeRequest(Request(prompts[i], _params(lengths[i], sampled[i]).resolved({})), on_event))

    def step():
        sched.step()
        assert sched.batch_size <= 3
        for r in sched.running:
            for block in r.blocks.table:
                holders.setdefault(block, set()).add(prompts.index(r.req.request.prompt_ids))

    submit(0), submit(1)
    for _ in range(2):
        step()
    assert sched.batch_size == 2 and all(r.sent > 0 for r in sched.running)  # mid-decode
    for i in (2, 3, 4):  # join a running batch; two have to wait for a row (max_batch_size 3)
        submit(i)
    step()
    assert sched.batch_size == 3 and sched.queue_length == 2
    submit(5)
    while sched.running or sched.queue_length:
        step()
    assert sched.blocks.available == sched.blocks.usable
    assert any(len(h) > 1 for h in holders.values()), "no block was reused"
    for i in range(len(prompts)):
        assert got[i].finish_reason == "length"
        assert got[i].token_ids == alone[i], f"request {i} differs from its run alone"


def test_scheduler_cancel_frees_the_blocks(tiny_llm):
    llm = tiny_llm
    sched = Scheduler(llm.model, llm.cache, llm.comm, llm.device, llm.eos_ids, blocks=llm.blocks)
    events = []
    req = ServeRequest(Request([5, 6, 7], _params(40).resolved({})), events.append)
    sched.submit(req)
    sched.step(), sched.step()
    assert sched.batch_size == 1 and sched.blocks.in_use == 1
    sched.cancel(req)
    n = len(events)
    sched.step()
    assert sched.batch_size == 0 and sched.blocks.in_use == 0 and len(events) == n
    other = []  # the freed block serves the next request, which matches its run alone
    sched.submit(ServeRequest(Request([8, 9], _params(5).resolved({})), lambda ev: other.extend(ev.token_ids)))
    while sched.step():
        pass
    assert other == llm.generate([[8, 9]], _params(5))[0].output_ids


def test_scheduler_a_failing_request_fails_alone(tiny_llm):
    llm = tiny_llm
    sched = Scheduler(llm.model, llm.cache, llm.comm, llm.device, llm.eos_ids, blocks=llm.blocks)
    bad, good = [], []
    bad_params = SamplingParams(max_tokens=4, temperature=0.5, seed=2**70).resolved({})  # torch refuses the seed
    sched.submit(ServeRequest(Request([4, 5], _params(6).resolved({})), lambda ev: good.extend(ev.token_ids)))
    sched.submit(ServeRequest(Request([6, 7], bad_params), bad.append))
    while sched.step():
        pass
    assert len(bad) == 1 and bad[0].finish_reason == "abort" and "Overflow" in bad[0].error
    assert good == llm.generate([[4, 5]], _params(6))[0].output_ids and sched.blocks.in_use == 0


def test_past_the_queue_cap_a_request_gets_429_with_retry_after(tiny_llm):
    import uvicorn

    from tp_runtime.serve.server import ServerState, create_app

    llm = tiny_llm
    sched = Scheduler(llm.model, llm.cache, llm.comm, llm.device, llm.eos_ids, blocks=llm.blocks)
    state = ServerState(sched, None, "tiny", 64, None, 1 << 20, threading.Lock(), max_queue=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
        for i in range(2):  # nothing runs the engine loop here: each request waits in the queue
            sched.submit(ServeRequest(Request([5, 6], _params(2).resolved({})), lambda ev: None))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 429 and e.value.headers["Retry-After"] == "1"
        error = json.loads(e.value.read())["error"]
        assert error["type"] == "rate_limit_error" and "--max_queue 2" in error["message"]
    finally:
        server.should_exit = True
        thread.join(10)
        sched.shutdown("test over")


def test_presence_and_frequency_penalties():
    """OpenAI's rule: logit - count * frequency_penalty - (count > 0) * presence_penalty, over generated tokens."""
    import torch

    from tp_runtime.runtime.sampling import RowSampler

    logits = torch.tensor([1.0, 0.9, 0.0, -1.0])
    plain = RowSampler(SamplingParams(greedy=True).resolved({}), [2], 4)
    assert [plain(logits) for _ in range(4)] == [0, 0, 0, 0]
    # counts (0, 1, 2) of token 0 -> 1, 0.75, 0.55; of token 1 -> 0.9, 0.65: picks alternate
    pen = RowSampler(SamplingParams(greedy=True, frequency_penalty=0.2, presence_penalty=0.05).resolved({}), [2], 4)
    assert [pen(logits) for _ in range(4)] == [0, 1, 0, 1]
    presence = RowSampler(SamplingParams(greedy=True, presence_penalty=1.5).resolved({}), [2], 4)
    assert [presence(logits) for _ in range(3)] == [0, 1, 2]  # each token once, then the next best


# --- the server, SmolLM2 at tp=2 under mpirun ---

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
           "What is 12 times 7?", "Who wrote Hamlet? Answer in one sentence, then explain why it matters.",
           "Translate 'good morning' to Spanish.", "List the planets of the solar system in order.", "Say hi."]
MAX_TOKENS = [12, 20, 7, 16, 24, 9, 18, 5]


class Reply:
    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _http(method: str, url: str, body=None, raw: bytes | None = None, headers: dict | None = None,
          timeout: float = 60) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def _children(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"tp-serve exited with {proc.returncode}:\n{out}\n{err}")
        try:
            if _http("GET", url + "/health", timeout=2).status_code == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail("tp-serve did not become healthy")


def _stop(proc: subprocess.Popen, ranks: list) -> tuple[str, str]:
    """SIGTERM to the ranks (mpirun passes signals on unevenly): rank 0 stops, tells rank 1; both exit."""
    for p in ranks:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for p in [*_children(proc.pid), proc]:
            p.kill()
        out, err = proc.communicate()
        pytest.fail(f"tp-serve did not stop on SIGTERM:\n{out}\n{err}")
    return out, err


@pytest.fixture(scope="module")
def smollm2_tp2(smollm2_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "smollm2_tp2"
    convert(smollm2_hf, str(path), 2, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def server(smollm2_tp2):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith(("OMPI_", "PMI_", "MPI_LOCAL"))] + ["RANK", "WORLD_SIZE"]:
        env.pop(k, None)
    proc = subprocess.Popen([tool("mpirun"), "-n", "2", *SERVE, "--engine", smollm2_tp2, "--port", str(port),
                             "--api_key", KEY, "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "8",
                             "--served_model_name", "smollm2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc)
    ranks = [p for p in _children(proc.pid) if "tp_runtime.cli.serve" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    yield {"url": url, "engine": smollm2_tp2}
    out, err = _stop(proc, ranks)
    assert proc.returncode == 0, f"tp-serve exited with {proc.returncode}:\n{out}\n{err}"
    assert "[tp-serve] stopped" in err
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), "a rank was left behind"


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = _http("GET", url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _metric(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_openai_client_chat_and_stream(server, client):
    before = _metrics(server["url"])
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    plain = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    assert "Paris" in text and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.model == "smollm2"
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason

    comp = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=10,
                                     temperature=0, logprobs=2)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=10, temperature=0, stream=True))
    assert streamed == comp.choices[0].text and len(comp.choices[0].logprobs.token_logprobs) == 10
    lp = comp.choices[0].logprobs
    assert all(t <= 0 for t in lp.token_logprobs) and all(len(top) == 2 for top in lp.top_logprobs)
    assert all(abs(lp.token_logprobs[i] - max(top.values())) < 1e-4 for i, top in enumerate(lp.top_logprobs))  # greedy

    after = _metrics(server["url"])
    assert _metric(after, "tp_serve_requests_total", kind="chat") - _metric(before, "tp_serve_requests_total", kind="chat") == 2
    assert _metric(after, "tp_serve_requests_total", kind="completion") - \
        _metric(before, "tp_serve_requests_total", kind="completion") == 2
    new_tokens = 2 * plain.usage.completion_tokens + 20
    assert _metric(after, "tp_serve_generation_tokens_total") - _metric(before, "tp_serve_generation_tokens_total") \
        == new_tokens
    assert _metric(after, "tp_serve_time_to_first_token_seconds_count") - \
        _metric(before, "tp_serve_time_to_first_token_seconds_count") == 4
    assert _metric(after, "tp_serve_inter_token_latency_seconds_count") - \
        _metric(before, "tp_serve_inter_token_latency_seconds_count") == new_tokens - 4
    assert _metric(after, "tp_serve_http_requests_total", route="/v1/chat/completions", status="200") >= 2
    assert ("tp_serve_queue_length", ()) in after and ("tp_serve_running_batch_size", ()) in after


def test_concurrent_requests_equal_their_runs_alone(server, client):
    """8 concurrent greedy requests (different prompts and lengths) give exactly what each gives alone,
    and what tp-run gives for the same prompts."""
    def ask(i):
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPTS[i]}],
                                           max_tokens=MAX_TOKENS[i], temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(i) for i in range(len(PROMPTS))]
    before = _metrics(server["url"])
    together = [None] * len(PROMPTS)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _metrics(server["url"])
    assert together == alone
    assert [n for _, n in alone] == MAX_TOKENS
    steps = _metric(after, "tp_serve_engine_steps_total", kind="decode") - \
        _metric(before, "tp_serve_engine_steps_total", kind="decode")
    rows = _metric(after, "tp_serve_engine_step_rows_total", kind="decode") - \
        _metric(before, "tp_serve_engine_step_rows_total", kind="decode")
    assert rows / steps > 2, f"the requests did not share decode steps (mean batch {rows / steps:.2f})"

    ref = tp_run_json(server["engine"], 2, ["--input_text", *PROMPTS, "--max_output_len", str(max(MAX_TOKENS)),
                                            "--ignore_eos"], launcher="mpirun")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server["engine"])
    for i, o in enumerate(ref["outputs"]):
        assert alone[i][0] == tok.decode(o["output_ids"][: MAX_TOKENS[i]], skip_special_tokens=True), i


def _post(url, path, body=None, raw=None, key=KEY, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return _http("POST", url + path, body, raw, h)


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [
    ("no key", "/v1/chat/completions", dict(body=CHAT, key=None), 401, "API key"),
    ("wrong key", "/v1/chat/completions", dict(body=CHAT, key="nope"), 401, "API key"),
    ("bad JSON", "/v1/chat/completions", dict(raw=b'{"model": "smollm2", '), 400, "not valid JSON"),
    ("not an object", "/v1/completions", dict(raw=b"[1, 2]"), 400, "must be a JSON object"),
    ("too large", "/v1/completions", dict(raw=b'{"prompt": "' + b"a" * (2 << 20) + b'"}'), 413, "limit of"),
    ("unknown model", "/v1/chat/completions", dict(body={**CHAT, "model": "gpt-4"}), 404, "does not exist"),
    ("n=2", "/v1/chat/completions", dict(body={**CHAT, "n": 2}), 400, "only n=1"),
    ("prompt too long", "/v1/completions", dict(body={"prompt": list(range(100, 100 + MAX_SEQ_LEN))}), 400,
     f"at most {MAX_SEQ_LEN - 1} prompt tokens"),
    ("max_tokens beyond the cache", "/v1/completions", dict(body={"prompt": [1, 2, 3], "max_tokens": MAX_SEQ_LEN}),
     400, f"ask for at most {MAX_SEQ_LEN - 3}"),
    ("max_tokens 0", "/v1/completions", dict(body={"prompt": "a", "max_tokens": 0}), 400, "'max_tokens' must be in"),
    ("temperature", "/v1/chat/completions", dict(body={**CHAT, "temperature": -1}), 400, "'temperature' must be in"),
    ("top_p", "/v1/chat/completions", dict(body={**CHAT, "top_p": 1.5}), 400, "'top_p' must be in"),
    ("presence_penalty", "/v1/chat/completions", dict(body={**CHAT, "presence_penalty": 3}), 400,
     "'presence_penalty' must be in"),
    ("stop type", "/v1/chat/completions", dict(body={**CHAT, "stop": [1]}), 400, "'stop' must be"),
    ("no messages", "/v1/chat/completions", dict(body={"model": "smollm2"}), 400, "'messages' must be"),
    ("image part", "/v1/chat/completions", dict(body={**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "only text content parts"),
    ("no prompt", "/v1/completions", dict(body={"max_tokens": 3}), 400, "'prompt' must be"),
    ("two prompts", "/v1/completions", dict(body={"prompt": ["a", "b"]}), 400, "one prompt per request"),
    ("token out of vocab", "/v1/completions", dict(body={"prompt": [1, 10 ** 6]}), 400, "outside the vocabulary"),
    ("top logprobs", "/v1/completions", dict(body={"prompt": "a", "logprobs": 50}), 400, "'logprobs' must be in"),
    ("top_logprobs alone", "/v1/chat/completions", dict(body={**CHAT, "top_logprobs": 2}), 400, "needs 'logprobs'"),
    ("stream_options", "/v1/chat/completions", dict(body={**CHAT, "stream_options": {"include_usage": True}}), 400,
     "only allowed with stream"),
    ("echo", "/v1/completions", dict(body={"prompt": "a", "echo": True}), 400, "'echo' is not supported"),
    ("seed type", "/v1/completions", dict(body={"prompt": "a", "seed": "x"}), 400, "'seed' must be an integer"),
    ("seed range", "/v1/completions", dict(body={"prompt": "a", "seed": 2**64}), 400, "'seed' must be in"),
    ("unknown route", "/v1/embeddings", dict(body={}), 404, "Not Found"),
]


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, client):
    url = server["url"]
    for label, path, kw, status, message in BAD:
        r = _post(url, path, **kw)
        assert r.status_code == status, f"{label}: {r.status_code} {r.text[:300]}"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, label
        assert message in err["message"], f"{label}: {err['message']}"
    assert _http("GET", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 405
    assert _http("GET", url + "/health").status_code == 200  # no key needed
    assert _http("GET", url + "/v1/models").status_code == 401
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    ok = client.completions.create(model="smollm2", prompt="One, two, three,", max_tokens=6, temperature=0)
    assert ok.choices[0].text and ok.usage.completion_tokens == 6


def test_disconnected_client_frees_its_slot(server, client):
    url = server["url"]
    before = _metrics(url)
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    got = [r.readline() for _ in range(6)]
    conn.close()  # the client goes away after a few tokens
    assert sum(line.startswith(b"data:") for line in got) >= 2
    deadline = time.time() + 30
    while time.time() < deadline:
        m = _metrics(url)
        if _metric(m, "tp_serve_requests_total", finish_reason="cancelled") > \
                _metric(before, "tp_serve_requests_total", finish_reason="cancelled") and \
                _metric(m, "tp_serve_running_batch_size") == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnected request kept its slot")
    assert _metric(m, "tp_serve_generation_tokens_total") - _metric(before, "tp_serve_generation_tokens_total") < 200
    ok = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_local_launcher_starts_the_ranks_itself(smollm2_tp2, tmp_path):
    """`tp-serve --engine E` with a tp=2 engine and no launcher: it starts both ranks and stops them on SIGTERM."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith(("OMPI_", "PMI_", "MPI_LOCAL"))] + ["RANK", "WORLD_SIZE"]:
        env.pop(k, None)
    proc = subprocess.Popen([*SERVE, "--engine", smollm2_tp2, "--port", str(port), "--max_seq_len", "128"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        r = _http("POST", url + "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    except BaseException:
        for p in [*_children(proc.pid), proc]:
            p.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "[tp-serve] stopped" in err and "error" not in err.lower()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
