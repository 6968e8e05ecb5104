"""The hierarchical all-reduce on one machine: ranks told they run on different hosts (tests/workers/comm_worker.py
passes each its host name), each host's ranks in a shared-memory segment of their own, the leaders over TCP.
Sums of different random data per rank equal, to the bit, the sum in the communicator's order, on every rank;
a dead leader or a dead member ends the job with the rank and its host named, alike on every rank. (tests/test_multihost.py runs an engine over
it on two network namespaces.)"""

import json
import os
import sys

import pytest

from helpers import run_ranks
from tp_runtime.distributed.hier_comm import layout

WORKER = os.path.join(os.path.dirname(__file__), "workers", "comm_worker.py")


def report(res, ok=True):
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def test_auto_layout():
    """One host: shared memory; hosts with 2+ ranks on one of them: hierarchical; one rank a host: gloo."""
    assert layout(["a", "a", "a"]) == "shm"
    assert layout(["a", "a", "b", "b"]) == "hier"
    assert layout(["a", "b", "a"]) == "hier"  # mpirun's round-robin placement: hosts need not be contiguous
    assert layout(["a", "a", "b"]) == "hier"
    assert layout(["a", "b"]) == "hier"  # one rank a host: the leaders' TCP link alone
    assert layout(["a", "b", "c"]) == "hier"


@pytest.mark.slow
@pytest.mark.parametrize("world,link", [(4, "tcp"), (3, "gloo")])
def test_known_sums_bit_identical_across_fake_hosts(world, link):
    """4 ranks as 2 + 2 over the TCP link (auto picks it); 3 as 2 + 1 (a host whose leader is alone) over gloo."""
    rep = report(run_ranks(world, [sys.executable, WORKER, "hier_sums", "auto", "hosts=2", link], timeout=300))
    assert rep["backend"] == "hier" and rep["checked"] > 500
    assert not rep["shm_left"] and not os.path.exists(rep["shm_path"])


@pytest.mark.slow
def test_a_dead_leader_fails_the_other_host_fast():
    """Rank 2, host 1's leader, dies: rank 0 (host 0's leader) sees its socket close and finds rank 2's beacon
    refused, rank 3 sees its pid gone, rank 1 (waiting on its leader) reads rank 0's notice: all three name rank 2
    and its host; nobody waits for the 20 s timeout."""
    res = run_ranks(4, [sys.executable, WORKER, "die_rank2", "auto", "hosts=2"], timeout=120)
    assert res.returncode != 0
    lost = "rank 2 on host fakehost1 ("
    lines = {r: next(x for x in res.stderr.splitlines() if f"CommError: rank {r}: " in x) for r in (0, 1, 3)}
    for r in (0, 3):
        assert f"rank {r}: {lost}" in lines[r] and lines[r].endswith("is lost: its process is gone (during all_reduce)")
    assert f"rank 1: {lost}" in lines[1] and lines[1].endswith("its process is gone (during all_reduce, seen by rank 0)")
    assert "within 20s" not in res.stderr
    assert not os.path.exists(report(res, ok=False)["shm_path"])
