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
            mine = (_host_address(), listener.getsockname()[1], secrets.token_bytes(16))
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
        self.bufs: list[torch.Tensor | None] = [None] * len(leaders)

    def exchange(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Every leader's `mine` (same size and dtype everywhere, contiguous), in leader order; mine is
        returned as it is, the others in buffers of this link that the next call overwrites."""
        n = mine.numel()
        parts = []
        for j in range(len(self.leaders)):
            if j == self.me:
                parts.append(mine)
                continue
            buf = self.bufs[j]
            if buf is None or buf.dtype != mine.dtype or buf.numel() < n:
                buf = self.bufs[j] = torch.empty(n, dtype=mine.dtype)
            parts.append(buf[:n])
        out = memoryview(mine.view(torch.uint8).numpy())
        nbytes = len(out)
        sent, got = {}, dict.fromkeys(self.peers, 0)
        into = {j: memoryview(parts[j].view(torch.uint8).numpy()) for j in self.peers}
        for j, s in self.peers.items():  # most messages leave whole here
            sent[j] = self._send(s, j, out, 0)
        waiting = set(self.peers)
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
                        try:
                            k = s.recv_into(into[j][got[j]:])
                        except BlockingIOError:
                            k = None
                        except OSError as e:
                            raise self._gone(j, e) from None
                        if k == 0:
                            raise self._gone(j, "connection closed")
                        got[j] += k or 0
                    events_j = self._events(sent[j], got[j], nbytes)
                    if events_j:
                        self.poller.modify(s, events_j)
                    else:
                        self.poller.unregister(s)
                        waiting.discard(j)
        finally:
            for j in waiting:
                self.poller.unregister(self.peers[j])
        return parts

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

    def _gone(self, j: int, why) -> CommError:
        return CommError(f"rank {self.rank}: leader rank {self.leaders[j]} died during an all-reduce ({why})")

    def close(self) -> None:
        for s in getattr(self, "peers", {}).values():
            s.close()
        self.peers = {}


def _host_address() -> str:
    """The address this host's name resolves to (where gloo listens too), or loopback when it has none."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during the hello")
        data += chunk
    return data
