"""The launchers across two hosts: tphost0 and tphost1 (conftest.two_hosts, launch/netns_hosts.sh) are network,
UTS and mount namespaces of this machine with their own addresses, hostnames and /dev/shm, so the ranks of
one engine on both see what ranks on two machines see: other hostnames, TCP between them, no shared memory.
Under torchrun (one command per host), mpirun (MPICH's hydra with a hostfile, netns-rsh standing in for ssh) and
Ray (a head and a worker node; tp-run --launcher ray and `ray job submit`), a tiny engine's greedy tokens equal
those of the same engine run on one host. A host lost mid-generation (its ranks killed, or its link cut) ends every
surviving rank within the collective timeout, with one line naming the lost rank and its host."""

import json
import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from helpers import build_checkpoint, random_prompts, run_ranks, save_char_tokenizer, tool
from netns_hosts import REPO, RSH, wait_all

import psutil

NEW_TOKENS = 8
PY = sys.executable
slow = pytest.mark.slow  # every test here but the placement rule starts processes on two hosts


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The same tiny checkpoint converted for tp=2 and tp=4 (4 heads, 2 KV heads: replicated at tp=4), with a
    character-level tokenizer (tp-serve needs one)."""
    from tp_runtime.convert.pipeline import convert

    root = tmp_path_factory.mktemp("multihost")
    build_checkpoint(str(root / "hf"), seed=11)
    save_char_tokenizer(str(root / "hf"))
    out = {}
    for tp in (2, 4):
        out[tp] = str(root / f"tp{tp}")
        convert(str(root / "hf"), out[tp], tp, progress=False)
    return out


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(103, seed=5)  # 4 rows of different lengths and tokens


def tp_run_args(engine: str, prompts, out: str) -> list[str]:
    return ["-m", "tp_runtime.cli.run", "--engine", engine, "--input_ids", *(",".join(map(str, p)) for p in prompts),
            "--max_output_len", str(NEW_TOKENS), "--ignore_eos", "--threads", "1", "--output_json", out]


@pytest.fixture(scope="module")
def single_host(engines, prompts, tmp_path_factory):
    """tp -> the outputs of that engine's ranks on this one host (shared memory between them), run once."""
    cache = {}

    def get(tp: int) -> list[dict]:
        if tp not in cache:
            out = str(tmp_path_factory.mktemp("single") / "out.json")
            res = run_ranks(tp, [PY, *tp_run_args(engines[tp], prompts, out)], env_extra={"PYTHONPATH": REPO})
            assert res.returncode == 0, res.stdout + res.stderr
            assert f"tp_size={tp} device=cpu comm=shm" in res.stderr
            cache[tp] = read_outputs(out)
        return cache[tp]

    return get


def read_outputs(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["outputs"]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    """Greedy ids identical row by row; log-probs equal but for the order of the sums (gloo's against shared memory's)."""
    assert len(got) == len(expected) == 4
    for row, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["input_ids"] == e["input_ids"], f"row {row}"
        assert g["output_ids"] == e["output_ids"], f"row {row}"
        diff = max(abs(a - b) for a, b in zip(g["output_logprobs"], e["output_logprobs"], strict=True))
        assert diff < 1e-4, f"row {row}: log-probs differ by {diff}"


@slow
def test_hosts_are_apart(two_hosts, tmp_path):
    """Each host has its name, its address, names for the others, a /dev/shm of its own; the disk is shared; and
    netns-rsh skips ssh's options as a launcher passes them."""
    h = two_hosts
    env = h.env()
    probe = ("import os, socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()), "
             "socket.gethostbyname('tphost0'), socket.gethostbyname('tphost1'), os.getcwd(), sorted(os.listdir('/dev/shm')))")
    marker = tmp_path / "disk"
    marker.write_text("shared\n")
    seen = []
    for k, host in enumerate(h.names):
        res = h.run(host, ["sh", "-c", f"touch /dev/shm/tp_rig_{host} && cat {marker} && {PY} -c \"{probe}\""], env)
        assert res.returncode == 0, res.stderr
        seen.append(res.stdout.split())
        assert seen[k][0] == "shared"
        assert seen[k][1:6] == [host, h.addrs[k], h.addrs[0], h.addrs[1], os.getcwd()]
        assert seen[k][6] == f"['tp_rig_{host}']"  # the other host's file is not there
    assert not os.path.exists("/dev/shm/tp_rig_tphost0")  # nor in this machine's
    # ssh's options, as hydra and Open MPI pass them, are skipped: flags, clusters, values apart or attached
    import subprocess

    res = subprocess.run([RSH, "-x", "-q", "-o", "BatchMode=yes", "-p", "22", "-xT", "-oConnectTimeout=5", "-l",
                          "root", "tphost1", "hostname"], env=env, capture_output=True, text=True, timeout=30)
    assert (res.returncode, res.stdout.strip()) == (0, "tphost1"), res.stderr


@slow
@pytest.mark.parametrize("tp", [2, 4])
def test_torchrun_two_hosts(two_hosts, engines, prompts, single_host, tmp_path, tp):
    """torchrun --nnodes 2 --node_rank K --rdzv_endpoint tphost0:PORT in each host; tp=4 runs 2 ranks a host, and
    --comm auto picks the hierarchical all-reduce for them."""
    h = two_hosts
    out = str(tmp_path / "out.json")
    port = 29500 + tp
    procs = [h.popen(host, [tool("torchrun"), "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node",
                            str(tp // 2), "--rdzv_endpoint", f"{h.names[0]}:{port}",
                            *tp_run_args(engines[tp], prompts, out)], h.env())
             for k, host in enumerate(h.names)]
    results = wait_all(procs, timeout=240)
    for k, (rc, stdout, stderr) in enumerate(results):
        assert rc == 0, f"{h.names[k]}:\n{stdout}\n{stderr}"
    # the ranks span hosts: hierarchical (at tp=4 two ranks share each host's memory, at tp=2 the TCP link alone)
    assert f"tp_size={tp} device=cpu comm=hier" in results[0][2]
    assert_same(read_outputs(out), single_host(tp))


@slow
def test_mpirun_hostfile_two_hosts(two_hosts, engines, prompts, single_host, tmp_path):
    """mpirun -f HOSTFILE -n 2 from tphost0, hydra reaching tphost1 through netns-rsh as it would through ssh."""
    h = two_hosts
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{host}:1\n" for host in h.names))
    out = str(tmp_path / "out.json")
    res = h.run(h.names[0], [tool("mpirun"), "-launcher", "ssh", "-launcher-exec", RSH, "-f", str(hostfile),
                             "-n", "2", PY, *tp_run_args(engines[2], prompts, out)], h.env(), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tp_size=2 device=cpu comm=hier" in res.stderr
    assert_same(read_outputs(out), single_host(2))


def torchrun_tp2(h, engine: str, port: int, extra: list[str]) -> list[subprocess.Popen]:
    """tp-run at tp=2 under torchrun, rank K on host K, decoding far longer than any test waits (4000 tokens)."""
    args = ["-m", "tp_runtime.cli.run", "--engine", engine, "--input_ids", "5,6,7", "--max_output_len", "4000",
            "--max_seq_len", "4096", "--ignore_eos", "--threads", "1", *extra]
    return [h.popen(host, [tool("torchrun"), "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node", "1",
                           "--rdzv_endpoint", f"{h.names[0]}:{port}", *args], h.env())
            for k, host in enumerate(h.names)]


def wait_decoding(proc: subprocess.Popen, seconds: float = 1.5) -> str:
    """Rank 0's lines up to its load report (generation starts right after it), then `seconds` of decoding."""
    seen = ""
    while "loaded in" not in seen:
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    time.sleep(seconds)
    assert proc.poll() is None, "generation ended before the fault; make it longer"
    return seen


def rank_output(stderr: str) -> str:
    """A rank's own lines: torchrun's report of the failed worker (its ChildFailedError traceback) cut off."""
    return stderr.split("torch/distributed/elastic")[0]


def assert_reports_lost(stderr: str, rank: int, lost: int, host: str, addr: str, why: str) -> None:
    own = rank_output(stderr)
    errors = [x for x in own.splitlines() if "error" in x.lower()]
    assert len(errors) == 1, stderr  # one line
    assert errors[0].startswith(f"error: rank {rank}: rank {lost} on host {host} ({addr}) is lost: {why} (during "), stderr
    assert "Traceback" not in own, stderr
    assert "(exitcode: 3)" in stderr  # the rank's own status, as torchrun reports it


@slow
def test_host_killed_mid_generation(two_hosts, engines, tmp_path):
    """tphost1's torchrun and rank are killed while rank 0 decodes: rank 0 finds rank 1's beacon refused and
    leaves at once, far within the 30 s timeout, naming rank 1 and tphost1."""
    h = two_hosts
    procs = torchrun_tp2(h, engines[2], 29521, ["--comm_timeout", "30"])
    try:
        wait_decoding(procs[0])
        victims = [*psutil.Process(procs[1].pid).children(recursive=True), psutil.Process(procs[1].pid)]
        for p in victims:
            p.kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert_reports_lost(err, 0, 1, h.names[1], h.addrs[1], "its process is gone")
    print(f"kill -> last exit {took:.1f}s")
    assert took < 15, f"{took:.1f}s from the kill to the exit"


@slow
def test_host_cut_off_mid_generation(two_hosts, engines, tmp_path):
    """tphost1's link goes down while both ranks decode: each side times out (--comm_timeout 5), finds the other
    host silent, and names it; both exit non-zero."""
    h = two_hosts
    procs = torchrun_tp2(h, engines[2], 29522, ["--comm_timeout", "5"])
    link = ["ip", "-n", "tphosts", "link", "set", "port1"]  # tphost1's port on the rig's bridge
    try:
        wait_decoding(procs[0])
        subprocess.run([*link, "down"], check=True)
        t0 = time.monotonic()
        results = wait_all(procs, timeout=60)
        took = time.monotonic() - t0
    finally:
        subprocess.run([*link, "up"], check=True)
        for p in procs:
            p.kill()
    why = "its host does not answer"
    assert_reports_lost(results[0][2], 0, 1, h.names[1], h.addrs[1], why)
    assert_reports_lost(results[1][2], 1, 0, h.names[0], h.addrs[0], why)
    assert all(rc != 0 for rc, _, _ in results)
    print(f"cut -> last exit {took:.1f}s")
    assert took < 5 + 15, f"{took:.1f}s from the cut to the last exit"


@slow
def test_serve_answers_503_when_a_host_is_lost(two_hosts, engines):
    """tp-serve at tp=2 under torchrun, rank 1 on tphost1; an openai client in tphost0 streams one completion and
    waits for another; tphost1's ranks are killed. The stream ends with an OpenAI error event, the waiting request
    gets a 503 JSON error, a new request and /health get 503, and the server exits non-zero, naming the host."""
    h = two_hosts
    args = ["-m", "tp_runtime.cli.serve", "--engine", engines[2], "--port", "8123", "--served_model_name", "tiny",
            "--max_seq_len", "4096", "--threads", "1", "--comm_timeout", "30"]
    servers = [h.popen(host, [tool("torchrun"), "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node", "1",
                              "--rdzv_endpoint", f"{h.names[0]}:29523", *args], h.env())
               for k, host in enumerate(h.names)]
    client = h.popen(h.names[0], [PY, os.path.join(REPO, "tests", "workers", "serve_client.py"),
                                  "http://127.0.0.1:8123", "tiny"], h.env())
    try:
        line = client.stdout.readline()
        assert line == "STREAMING\n", line + client.communicate(timeout=30)[1]
        for p in [*psutil.Process(servers[1].pid).children(recursive=True), psutil.Process(servers[1].pid)]:
            p.kill()
        t0 = time.monotonic()
        out, err = client.communicate(timeout=60)
        _, server_err = servers[0].communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        for p in [*servers, client]:
            p.kill()
    assert client.returncode == 0, err
    report = json.loads(out.split("REPORT ", 1)[1])
    lost = f"rank 1 on host {h.names[1]} ({h.addrs[1]}) is lost: its process is gone"
    stream = report["stream"]
    assert stream["chunks"] >= 3 and stream["error"] == "APIError", report  # an error event, not a dropped connection
    assert stream["body"]["type"] == "server_error" and lost in stream["body"]["message"], report
    assert report["plain"]["status"] == 503 and lost in report["plain"]["body"]["message"], report
    assert report["after"]["status"] == 503 and lost in report["after"]["body"]["message"], report
    assert report["health"] == 503, report
    assert servers[0].returncode != 0
    assert_reports_lost(server_err, 0, 1, h.names[1], h.addrs[1], "its process is gone")
    print(f"kill -> server exit {took:.1f}s")
    assert took < 15, f"{took:.1f}s from the kill to the server's exit"


@pytest.fixture(scope="module")
def ray_two_nodes(two_hosts):
    """A Ray head in tphost0 and a worker node in tphost1, one CPU each, with token authentication; returns the
    environment every Ray command needs (the mode and the token)."""
    h = two_hosts
    env = h.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    small = ["--num-cpus", "1", "--object-store-memory", str(100 << 20), "--disable-usage-stats"]
    head = h.run(h.names[0], ["ray", "start", "--head", "--port", "6379", "--dashboard-host", "0.0.0.0",
                              "--dashboard-port", "8265", *small], env, timeout=120)
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        worker = h.run(h.names[1], ["ray", "start", "--address", f"{h.names[0]}:6379", *small], env, timeout=120)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield env
    finally:
        for host in h.names:
            h.run(host, ["ray", "stop", "--force"], env, timeout=60)


def assert_one_rank_per_node(text: str, h) -> None:
    placed = re.search(r"Ray placement STRICT_SPREAD: rank 0 on (\w+) \([\d.]+\), rank 1 on (\w+) \([\d.]+\)", text)
    assert placed and set(placed.groups()) == set(h.names), text


@slow
def test_ray_tp_run_two_nodes(two_hosts, ray_two_nodes, engines, prompts, single_host, tmp_path):
    """tp-run --launcher ray --placement spread --ray_address tphost0:6379: one rank on each node."""
    h = two_hosts
    out = str(tmp_path / "out.json")
    res = h.run(h.names[0], [PY, *tp_run_args(engines[2], prompts, out), "--launcher", "ray", "--placement", "spread",
                             "--ray_address", f"{h.names[0]}:6379"], ray_two_nodes, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_one_rank_per_node(res.stderr, h)
    assert "tp_size=2 device=cpu comm=hier" in res.stderr
    assert_same(read_outputs(out), single_host(2))


@slow
def test_ray_job_submit_two_nodes(two_hosts, ray_two_nodes, engines, prompts, single_host, tmp_path):
    """launch/ray_job.sh: `ray job submit` to the head's job server; the driver runs on the cluster."""
    h = two_hosts
    out = str(tmp_path / "out.json")
    env = dict(ray_two_nodes, RAY_ADDRESS=f"http://{h.names[0]}:8265")
    args = tp_run_args(engines[2], prompts, out)[4:]  # the script gives -m tp_runtime.cli.run --engine E itself
    res = h.run(h.names[0], ["bash", os.path.join(REPO, "launch", "ray_job.sh"), engines[2], "--placement", "spread",
                             *args], env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    logs = res.stdout + res.stderr
    assert_one_rank_per_node(logs, h)
    assert "succeeded" in logs
    assert_same(read_outputs(out), single_host(2))


def test_spread_is_strict_when_each_rank_has_a_node():
    """--placement spread asks Ray for one rank per node (STRICT_SPREAD) when the cluster has a node for every
    rank's bundle, and for SPREAD otherwise (it could never be granted strictly)."""
    from tp_runtime.distributed.ray_cluster import strategy

    class FakeRay:
        def __init__(self, cpus):
            self.cpus = cpus

        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": c}} for c in self.cpus] + [{"Alive": False, "Resources": {"CPU": 8}}]

    assert strategy(FakeRay([1, 1]), 2, {"CPU": 1}, "spread") == "STRICT_SPREAD"
    assert strategy(FakeRay([2]), 2, {"CPU": 1}, "spread") == "SPREAD"
    assert strategy(FakeRay([4, 1]), 2, {"CPU": 2}, "spread") == "SPREAD"  # only one node holds a 2-CPU bundle
    assert strategy(FakeRay([1, 1]), 2, {"CPU": 1}, "pack") == "STRICT_PACK"


@slow
def test_ray_node_lost_then_restarted_on_the_rest(two_hosts, ray_two_nodes, engines, prompts, single_host, tmp_path):
    """tphost1's raylet is killed while tp-run --launcher ray decodes with a rank on each node: the driver names the
    rank and its node in one line and exits 3; tp-run --launcher ray --tp_size 1 then runs the same engine, re-sliced, on the node left.
    (Last in this file: the worker node stays stopped.)"""
    h = two_hosts
    args = ["-m", "tp_runtime.cli.run", "--engine", engines[2], "--input_ids", "5,6,7", "--max_output_len", "4000",
            "--max_seq_len", "4096", "--ignore_eos", "--launcher", "ray", "--placement", "spread",
            "--ray_address", f"{h.names[0]}:6379", "--comm_timeout", "30"]
    driver = h.popen(h.names[0], [PY, *args], ray_two_nodes)
    try:
        seen = wait_decoding(driver, seconds=2.0)
        assert_one_rank_per_node(seen, h)
        lost = int(re.search(rf"rank (\d) on {h.names[1]} ", seen).group(1))  # Ray chose which rank goes where
        # tphost1's raylet killed (`ray stop` would stop every host's Ray: the rig's hosts share one process table)
        keeper = open(f"/run/tp_netns_hosts/{h.names[1]}.pid").read().strip()
        pids = subprocess.run(["ip", "netns", "pids", h.names[1]], capture_output=True, text=True).stdout.split()
        raylets = [p for p in pids if p != keeper and "raylet" in psutil.Process(int(p)).name()]
        assert len(raylets) == 1, raylets
        psutil.Process(int(raylets[0])).kill()
        t0 = time.monotonic()
        _, err = driver.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        driver.kill()
    print(f"raylet killed -> driver exit {took:.1f}s")
    assert driver.returncode == 3, err
    where = f"node {h.names[1]} ({h.addrs[1]})"
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank {lost} on {where} died during run: "), err
    assert errors[0].endswith("; the other ranks were stopped") and "Traceback" not in err, err
    assert took < 30, f"{took:.1f}s from `ray stop` to the driver's exit"
    out = str(tmp_path / "out.json")
    res = h.run(h.names[0], [PY, *tp_run_args(engines[2], prompts, out), "--launcher", "ray", "--tp_size", "1",
                             "--ray_address", f"{h.names[0]}:6379"], ray_two_nodes, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"rank 0 on {h.names[0]}" in res.stderr and "tp_size=1 (re-sliced from 2)" in res.stderr, res.stderr
    got, expected = read_outputs(out), single_host(2)
    assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]
