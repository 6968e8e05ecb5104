"""Which ranks are lost, asked once a collective has failed, so the error can name them and their hosts.

A failed collective says little by itself: gloo reports "Connection closed by peer" or "Timed out waiting
45000ms", with a socket address at best. So every rank keeps a Beacon, a TCP socket listening on a port the
kernel picks and never accepted from: the kernel answers a connection to it for as long as the process
lives, and refuses it (RST) the moment the process is gone. The ranks all-gather their Peer records at
start-up; after a failure, a rank asks about every other rank at once:

    same host name as mine  -> /proc/PID: gone when there is no such process (or only its zombie)
    another host            -> a non-blocking connect to its beacon, all in flight together, for PROBE_S:
                                 connected             alive
                                 refused               gone: its host is up, the process is not
                                 timeout, unreachable  silent: its host does not answer (down, cut off)

Nothing runs until a failure: no thread, no traffic, one socket per rank.
"""

import errno
import os
import select
import socket
import time
from dataclasses import dataclass

PROBE_S = 2.0  # how long a remote beacon gets to answer
SETTLE_S = 1.0  # how long find_lost asks again while every rank still looks alive
GONE, SILENT = "gone", "silent"
WHY = {GONE: ("its process is gone", "their processes are gone"),
       SILENT: ("its host does not answer", "their host does not answer")}


@dataclass(frozen=True)
class Peer:
    """Where one rank runs: its host name (as the launcher groups ranks), the address its beacon listens
    at, the beacon's port, its process id."""
    host: str
    addr: str
    port: int
    pid: int


class Beacon:
    """A listening socket that the kernel answers for this process; see the module docstring."""

    def __init__(self, backlog: int = 1024):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("", 0))
        self.sock.listen(backlog)  # probes queue up unaccepted: one per peer and failure, far below this
        self.port = self.sock.getsockname()[1]

    def peer(self, host: str) -> Peer:
        return Peer(host, host_address(), self.port, os.getpid())

    def close(self) -> None:
        self.sock.close()


def host_address() -> str:
    """The address this host's name resolves to (where gloo listens too), or loopback when it has none."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a killed child nobody has reaped yet is a zombie


def probe(peers: list[Peer], me: int, timeout_s: float = PROBE_S) -> dict[int, str]:
    """{rank: GONE or SILENT} for every rank but `me` that is not alive; see the module docstring."""
    lost: dict[int, str] = {}
    pending: dict[int, tuple[socket.socket, int]] = {}  # fd -> (socket, rank)
    for r, p in enumerate(peers):
        if r == me:
            continue
        if p.host == peers[me].host:
            if not pid_alive(p.pid):
                lost[r] = GONE
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        code = s.connect_ex((p.addr, p.port))
        if code in (0, errno.EINPROGRESS):
            pending[s.fileno()] = (s, r)
        else:
            lost[r] = GONE if code == errno.ECONNREFUSED else SILENT
            s.close()
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        events = poller.poll(max(0.0, left) * 1000) if left > 0 else []
        if not events:
            break
        for fd, _ in events:
            s, r = pending.pop(fd)
            poller.unregister(fd)
            code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                lost[r] = GONE if code == errno.ECONNREFUSED else SILENT
            s.close()
    for s, r in pending.values():  # no answer in time
        lost[r] = SILENT
        s.close()
    return dict(sorted(lost.items()))


def find_lost(peers: list[Peer], me: int, timeout_s: float = PROBE_S) -> dict[int, str]:
    """probe(), asked again for up to SETTLE_S while it finds nobody lost: a dying process can close the
    socket a collective was reading before its beacon, and a collective that failed is worth a second look."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        lost = probe(peers, me, timeout_s)
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.1)


def describe(lost: dict[int, str], peers: list[Peer]) -> str:
    """'rank 1 on host tphost1 (10.231.0.2) is lost: its process is gone', one clause per host and reason,
    joined with '; '."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for r, why in lost.items():
        groups.setdefault((peers[r].host, peers[r].addr, why), []).append(r)
    parts = []
    for (host, addr, why), ranks in groups.items():
        many = len(ranks) > 1
        who = f"ranks {', '.join(map(str, ranks))}" if many else f"rank {ranks[0]}"
        parts.append(f"{who} on host {host} ({addr}) {'are' if many else 'is'} lost: {WHY[why][many]}")
    return "; ".join(parts)
