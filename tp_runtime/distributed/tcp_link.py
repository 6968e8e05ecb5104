"""TcpLink: the host leaders' exchange of partial sums, over plain TCP sockets, one connection per pair.

Each leader sends its buffer to every other leader and receives theirs, all at once: non-blocking sockets
and one poll() loop, so no pair waits for another and a large buffer cannot dead-lock two leaders that
both write before they read. For two hosts that is one message each way, in flight at the same time:
one one-way trip plus the copy, against gloo's protocol on top of the same sockets.

Set-up (every rank calls it, leaders and the others alike, since it goes through the world's gloo group):
each leader listens on a port the kernel picks, at the address its hostname resolves to (as gloo does);
the addresses and a random token are all-gathered; leader j connects to every leader i < j and sends
(token, j); leader i accepts the connections of every j > i and keeps only those that present the token.
Every wait is bounded by the communicator's timeout; a peer that closes its end (a dead process) is an
error at once. Errors are CommErrors that name the global rank of the leader at fault.
"""

import secrets
import select
import socket
import struct
import time

import torch

from tp_runtime.distributed.liveness import host_address
from tp_runtime.errors import CommError

HELLO = struct.Struct("!16sI")  # token, the sender's index among the leaders


class TcpLink:
    def __init__(self, comm, leaders: list[int]):
        """comm: the communicator (rank, timeout_s, _all_gather_object over every rank); leaders: global ranks."""
        self.rank, self.timeout_s, self.leaders = comm.rank, comm.timeout_s, leaders
        self.me = leaders.index(comm.rank) if comm.rank in leaders else None
        listener, mine = None, None
        if self.me is not None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("", 0))
            listener.listen(len(leaders))
            mine = (host_address(), listener.getsockname()[1], secrets.token_bytes(16))
        offers = comm._all_gather_object(mine)
        if self.me is None:
            return
        self.peers: dict[int, socket.socket] = {}  # leader index -> connection
        try:
            deadline = time.monotonic() + self.timeout_s
            for i in range(self.me):
                addr, port, token = offers[leaders[i]]
                s = socket.create_connection((addr, port), timeout=self.timeout_s)
                s.sendall(HELLO.pack(token, self.me))
                self.peers[i] = s
            listener.settimeout(1.0)
            while len(self.peers) < len(leaders) - 1:
                if time.monotonic() > deadline:
                    late = [leaders[j] for j in range(self.me + 1, len(leaders)) if j not in self.peers]
                    raise CommError(f"rank {self.rank}: leader rank(s) {late} did not connect within "
                                    f"{self.timeout_s:.0f}s")
                try:
                    s, _ = listener.accept()
                except socket.timeout:
                    continue
                s.settimeout(self.timeout_s)
                try:
                    token, j = HELLO.unpack(_recv_exactly(s, HELLO.size))
                except (OSError, ConnectionError):
                    s.close()
                    continue
                if token != mine[2] or not self.me < j < len(leaders) or j in self.peers:
                    s.close()  # not one of ours
                    continue
                self.peers[j] = s
        except OSError as e:
            raise CommError(f"rank {self.rank}: could not link the host leaders ({e})") from None
        finally:
            listener.close()
        for s in self.peers.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        self.fd_peer = {s.fileno(): j for j, s in self.peers.items()}
        self.poller = select.poll()
        self.store = torch.empty(0)  # (leaders, capacity) fp32: row j holds leader j's partial
        self.views: dict[int, tuple] = {}  # n -> (parts, my bytes, {peer: its bytes}): made once per size

    def buffers(self, n: int) -> list[torch.Tensor]:
        """One fp32 vector of n per leader, in leader order: the caller writes its partial into its own
        (index self.me), exchange(n) fills the others. The same tensors come back for the same n."""
        hit = self.views.get(n)
        if hit is None:
            if self.store.shape[-1] < n:
                self.store = torch.empty(len(self.leaders), n, dtype=torch.float32)
                self.views.clear()
            if len(self.views) > 16:  # prefill lengths vary: keep a few sizes, not all of them
                self.views.clear()
            parts = [self.store[j, :n] for j in range(len(self.leaders))]
            raw = [memoryview(p.view(torch.uint8).numpy()) for p in parts]
            hit = self.views[n] = (parts, raw[self.me], {j: raw[j] for j in self.peers})
        return hit[0]

    def exchange(self, n: int) -> None:
        """Send my buffer of n to every other leader and receive theirs, all at once."""
        _, out, into = self.views[n]
        nbytes = len(out)
        sent, got = {}, {}
        for j, s in self.peers.items():  # most messages leave whole here, and the peers' have often arrived
            sent[j] = self._send(s, j, out, 0)
        for j, s in self.peers.items():
            got[j] = self._recv(s, j, into[j], 0)
        waiting = {j for j in self.peers if sent[j] < nbytes or got[j] < nbytes}
        if not waiting:
            return
        for j in waiting:
            self.poller.register(self.peers[j], self._events(sent[j], got[j], nbytes))
        deadline = time.monotonic() + self.timeout_s
        try:
            while waiting:
                left = deadline - time.monotonic()
                events = self.poller.poll(left * 1000) if left > 0 else []
                if not events:
                    late = sorted(self.leaders[j] for j in waiting)
                    raise CommError(f"rank {self.rank}: leader rank(s) {late} did not exchange an all-reduce's "
                                    f"partial sums within {self.timeout_s:.0f}s")
                for fd, ev in events:
                    j = self.fd_peer[fd]
                    s = self.peers[j]
                    if ev & select.POLLOUT and sent[j] < nbytes:
                        sent[j] = self._send(s, j, out, sent[j])
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and got[j] < nbytes:
                        got[j] = self._recv(s, j, into[j], got[j])
                    events_j = self._events(sent[j], got[j], nbytes)
                    if events_j:
                        self.poller.modify(s, events_j)
                    else:
                        self.poller.unregister(s)
                        waiting.discard(j)
        finally:
            for j in waiting:
                self.poller.unregister(self.peers[j])

    @staticmethod
    def _events(sent: int, got: int, nbytes: int) -> int:
        """What to poll a peer for: its data while some is missing, room to write while ours is not all out."""
        return (select.POLLIN if got < nbytes else 0) | (select.POLLOUT if sent < nbytes else 0)

    def _send(self, s: socket.socket, j: int, out: memoryview, start: int) -> int:
        try:
            return start + s.send(out[start:])
        except BlockingIOError:
            return start
        except OSError as e:
            raise self._gone(j, e) from None

    def _recv(self, s: socket.socket, j: int, into: memoryview, start: int) -> int:
        """Read what has arrived from peer j into into[start:] (a non-blocking read of nothing: the peer is gone)."""
        try:
            k = s.recv_into(into[start:])
        except BlockingIOError:
            return start
        except OSError as e:
            raise self._gone(j, e) from None
        if k == 0 and len(into) > start:
            raise self._gone(j, "connection closed")
        return start + k

    def _gone(self, j: int, why) -> CommError:
        return CommError(f"rank {self.rank}: leader rank {self.leaders[j]} died during an all-reduce ({why})")

    def close(self) -> None:
        for s in getattr(self, "peers", {}).values():
            s.close()
        self.peers = {}


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during the hello")
        data += chunk
    return data
