"""The hierarchical CPU all-reduce, for ranks on several hosts: shared memory within a host, one leader per
host over TCP between hosts, shared memory again to hand the result back.

Ranks are grouped by host name (in rank order); a host's leader is its lowest rank, and the hosts are ordered
by their leaders. Each host maps one segment of shm_comm.py's layout, shared by its own ranks only:

    host A: ranks 0, 1              host B: ranks 2, 3
    ┌──────────────────────┐        ┌──────────────────────┐
    │ rank 1 ─copy─> slot 1│        │ rank 3 ─copy─> slot 1│        1. the others post their inputs
    │ rank 0: p_A = x0 + x1│        │ rank 2: p_B = x2 + x3│        2. the leader sums its host (fp32)
    │        │   ▲         │        │        │   ▲         │
    └────────┼───┼─────────┘        └────────┼───┼─────────┘
             └───┼──── p_A ──TCP──> ─────────┘   │                  3. the leaders swap partial sums
                 └──────── <──TCP── p_B ─────────┘                     (both directions at once)
      rank 0: y = p_A + p_B                 rank 2: y = p_A + p_B      4. each leader adds them in host order,
      y -> slot 0, flag = s                 y -> slot 0, flag = s         writes y into its slot 0
      rank 1: reads slot 0                  rank 3: reads slot 0       5. the others copy y out

    collective number s, buffer s % 2, on each host:
      1. every rank waits until its host's flags >= s - 1 (all have left collective s - 2, which used this
         buffer); a rank other than the leader copies its input into its slot and sets its flag = s
      2. the leader waits for its host's flags >= s, sums its own input and the slots in rank order (in fp32)
      3. the leaders exchange these partial sums (TcpLink, or gloo's all_gather over a group of the leaders)
      4. every leader sums the partials in host order, so every leader computes the same bits; it writes
         the sum into its slot and sets its flag = s
      5. the others wait for the leader's flag >= s and copy the leader's slot
Every rank ends with the bytes its leader wrote, and the leaders all computed the same bytes: the results
are bit-identical on every rank of every host. Tensors larger than a slot go in slot-sized chunks.

The leaders' exchange is an all-gather, not an all-reduce, so the sum's order is ours (host order), whatever
the transport: with two hosts it moves the same bytes as any all-reduce. TcpLink (the default) sends each
partial once to each other leader, all in flight at once; leader_link="gloo" uses a gloo group of the
leaders instead (every rank creates it, in the same order). all_gather, broadcast and the object collectives
go over the world's gloo group. Waits in shared memory have the communicator's timeout and notice a dead
local rank by its pid; the leaders' exchange has the same timeout and notices a dead leader by its closed
socket. x86-64 only, as shm_comm.py (the same store-order argument).

Layout chosen at start-up, for --comm auto (make_communicator): one host -> shared memory (shm_comm.py's
protocol, this class behaving as ShmCommunicator); several hosts -> hierarchical (with one rank a host, only
the leaders' link is left). --comm hier insists on the hierarchical path (an error, not gloo, where it cannot
serve); --comm gloo asks for gloo.
"""

import torch

from tp_runtime.distributed.comm import TorchDistCommunicator, _guard
from tp_runtime.distributed.launch import LaunchInfo
from tp_runtime.distributed.shm_comm import ShmCommunicator
from tp_runtime.distributed.tcp_link import TcpLink

LEADER_LINKS = ("tcp", "gloo")


def layout(hosts: list[str]) -> str:
    """--comm auto's choice for ranks on `hosts` (each rank's host name, in rank order): shm on one host, else
    hier, one rank a host included (then only the leaders' TCP link is left: SmolLM2 at tp 2 across two hosts
    decodes ~3x faster over it than over gloo, benchmarks/bench_two_hosts.py)."""
    return "shm" if len(set(hosts)) == 1 else "hier"


class GlooLink:
    """The leaders' exchange over a gloo group of the leaders (created by every rank)."""

    def __init__(self, comm, leaders: list[int]):
        self.comm = comm
        self.group = comm._subgroup(leaders)
        self.me = leaders.index(comm.rank) if comm.rank in leaders else None
        self.count = len(leaders)
        self.store = torch.empty(0)

    def buffers(self, n: int) -> list[torch.Tensor]:
        if self.store.shape[-1] < n:
            self.store = torch.empty(self.count, n, dtype=torch.float32)
        return [self.store[j, :n] for j in range(self.count)]

    def exchange(self, n: int) -> None:
        parts = self.buffers(n)
        self.comm._all_gather_into(parts, parts[self.me], self.group)

    def close(self) -> None:
        pass


class HierarchicalCommunicator(ShmCommunicator):
    """Shared memory within each host, the hosts' leaders over TCP; see the module docstring."""

    kind = "hier"

    def __init__(self, info: LaunchInfo, timeout_s: float, required: bool = False, host: str | None = None,
                 leader_link: str = "tcp"):
        """required: --comm hier (a layout it cannot serve, a CPU it cannot trust: an error, not gloo);
        host: this rank's host name (default: the hostname); leader_link: tcp or gloo."""
        if leader_link not in LEADER_LINKS:
            raise ValueError(f"leader_link must be one of {LEADER_LINKS}, got {leader_link!r}")
        self.link = None
        super().__init__(info, timeout_s, required, host)
        if not self.enabled or self.one_host:
            return  # gloo, or one host's shared memory
        self.backend = "hier"
        first = {}
        for q, h in enumerate(self.hosts):
            first.setdefault(h, q)
        self.leaders = sorted(first.values())
        self.leader = self.members[0] == self.rank
        self.link = (TcpLink if leader_link == "tcp" else GlooLink)(self, self.leaders)

    def _wants_segment(self, required: bool) -> bool:
        return True  # one host or several: --comm auto never asks for gloo here

    # --- collectives ---

    @_guard
    def _all_reduce(self, tensor):
        return super()._all_reduce(tensor)  # ShmCommunicator's chunks, each through _reduce_chunk below

    def _reduce_chunk(self, part: torch.Tensor, slots) -> None:
        if self.link is None:  # one host: the shared-memory sum alone
            return super()._reduce_chunk(part, slots)
        n = part.numel()
        s, b = self._begin()
        rows = [row[:n] for row in slots[b]]  # every local rank's slot, this chunk's length
        if not self.leader:
            rows[self.me].copy_(part)
            self._post(s)
            self._wait([0], s, spins_per_check=1)  # the leader is on the network: leave it the core
            part.copy_(rows[0])
            return
        if len(rows) > 1:
            self._wait(self.everyone[1:], s, spins_per_check=1)  # yielding: a rank of the other host may need the core
        parts = self.link.buffers(n)  # one fp32 vector per host, in host order
        partial = parts[self.link.me]
        if len(rows) == 1:  # alone on this host: no slot to write, nobody to hand the sum to
            partial.copy_(part)
        elif len(rows) == 2 and part.dtype == torch.float32:
            torch.add(part, rows[1], out=partial)
        else:
            torch.sum(torch.stack([part, *rows[1:]]), dim=0, dtype=torch.float32, out=partial)
        self.link.exchange(n)
        if len(parts) == 2:
            torch.add(parts[0], parts[1], out=partial)  # (partial is one of them: the sum is elementwise)
        else:
            acc = parts[0].clone()
            for p in parts[1:]:
                acc += p
            partial.copy_(acc)
        if len(rows) == 1:
            part.copy_(partial)
        else:
            rows[0].copy_(partial)
            part.copy_(rows[0])
        self._post(s)

    def _all_gather(self, tensor, dim=-1):
        if self.link is not None:
            return TorchDistCommunicator._all_gather(self, tensor, dim)
        return super()._all_gather(tensor, dim)

    def broadcast(self, tensor, src=0):
        if self.link is not None:
            return TorchDistCommunicator.broadcast(self, tensor, src)
        return super().broadcast(tensor, src)

    def close(self):
        if self.link is not None:
            self.link.close()
        super().close()
