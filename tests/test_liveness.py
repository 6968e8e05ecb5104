"""Which ranks are lost (tp_runtime/distributed/liveness.py), in one process: a beacon that lives answers, a closed one
is refused, an address nobody answers for is silent, a rank of this host is judged by its pid; the line names them."""

import os
import socket
import subprocess
import sys
import time

from tp_runtime.distributed.liveness import GONE, SILENT, Beacon, Peer, describe, probe


def test_probe_tells_alive_gone_and_silent_apart():
    alive, closed = Beacon(), Beacon()
    closed.close()
    # a host that does not answer: a listener whose accept queue is full drops new connections' SYNs
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for f in fillers:
        f.setblocking(False)
        f.connect_ex(full.getsockname())
    time.sleep(0.2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Peer("hostA", "127.0.0.1", 1, os.getpid())
    peers = [me,
             Peer("hostB", "127.0.0.1", alive.port, 10**7),  # another host: its beacon decides, not the pid
             Peer("hostB", "127.0.0.1", closed.port, os.getpid()),
             Peer("hostC", "127.0.0.1", full.getsockname()[1], 1),
             Peer("hostA", "127.0.0.1", 1, dead.pid),  # this host: the pid decides
             Peer("hostA", "127.0.0.1", 1, os.getpid())]
    try:
        assert probe(peers, 0, timeout_s=0.5) == {2: GONE, 3: SILENT, 4: GONE}
    finally:
        for s in [alive, full, *fillers]:
            s.close()


def test_the_line_groups_ranks_by_host_and_reason():
    peers = [Peer("a", "10.0.0.1", 1, 1), Peer("a", "10.0.0.1", 1, 2), Peer("b", "10.0.0.2", 1, 3),
             Peer("b", "10.0.0.2", 1, 4), Peer("c", "10.0.0.3", 1, 5)]
    assert describe({2: GONE, 3: GONE, 4: SILENT}, peers) == (
        "ranks 2, 3 on host b (10.0.0.2) are lost: their processes are gone; "
        "rank 4 on host c (10.0.0.3) is lost: its host does not answer")
