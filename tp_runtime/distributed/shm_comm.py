"""A shared-memory communicator for ranks on the CPUs of one host.

gloo moves a 576-float all-reduce between two local processes in ~0.5 ms; a decode step does one per
row-parallel layer. Here every rank writes into its slot of one shared buffer and reads the others'
slots directly, with sequence flags instead of barriers:

    segment = [flags: one 64-byte line per rank][notices: NOTICE_BYTES per rank][data: 2 buffers x world slots x SLOT_BYTES]

(hier_comm.py maps one such segment per host, for that host's ranks: flags and slots are indexed by a rank's
position among the segment's members, self.me, which is the rank itself here.)

    collective number s (every rank counts the same collectives in the same order), buffer s % 2:
      1. wait until every rank's flag >= s - 1     (all have left collective s - 2, which used this buffer)
      2. copy my input into my slot, then set my flag = s
      3. wait until the flags I need are >= s, and read: sum the slots in rank order (all-reduce),
         concatenate them (all-gather), or copy the source's slot (broadcast)

Each rank sums the same slots in the same order, so every rank gets bit-identical results; bf16 / fp16
are accumulated in fp32.

Memory ordering: a rank's data stores (torch's copy) must be visible before its flag store, and a reader's
data loads must not run ahead of its flag load. Python has no atomics with acquire / release semantics, so
this relies on the hardware: x86-64 is total-store-order (stores are seen in program order, loads are not
reordered with older loads), which gives exactly release on every store and acquire on every load; and the
flag store is a separate Python statement after copy_() returns, so no compiler reorders across it. ARM
(Graviton, Grace) and other weakly ordered CPUs give no such guarantee: there this communicator refuses to
run (auto falls back to gloo with a warning; --comm shm is an error) rather than risk torn sums.
A rank whose collective failed and found which ranks are lost (comm.py, liveness.py) writes that verdict into
its notice (the text, then its length, in that order, as the flags); a waiting rank reads the notices at every
look and ends with the same verdict, so every rank of a host names the same lost ranks.
The segment is a /dev/shm file that rank 0 unlinks as soon as every rank has mapped it, so nothing is
left in /dev/shm after a normal exit or a kill. A wait gives up after the timeout, and sooner when a
peer process is gone. Tensors larger than a slot (long prefills) are all-reduced in slot-sized chunks;
an all-gather or broadcast that does not fit goes through gloo.
"""

import mmap
import os
import platform
import time
import uuid
import warnings

import torch

from tp_runtime.distributed.comm import TorchDistCommunicator, _guard
from tp_runtime.distributed.liveness import pid_alive
from tp_runtime.errors import CommError, UserError
from tp_runtime.distributed.launch import LaunchInfo

SLOT_BYTES = 4 << 20
TSO_MACHINES = ("x86_64", "amd64", "i386", "i686")  # total store order: see the module docstring
FLAG_STRIDE = 8  # int64 entries between two ranks' flags: one 64-byte cache line each
SPINS_PER_CHECK = 2000
BACKOFF_AFTER_S = 0.005  # see _wait
MAX_SLEEP_S = 0.005
LOOK_EVERY_S = 0.05
NOTICE_BYTES = 1024  # a rank's notice: an int64 length, then UTF-8 text


class ShmCommunicator(TorchDistCommunicator):
    """Local ranks over shared memory; gloo underneath for set-up, Python objects and oversize tensors."""

    kind = "shm"  # the --comm name that insists on this class

    def __init__(self, info: LaunchInfo, timeout_s: float, required: bool = False, host: str | None = None):
        """host: this rank's host name (default: the hostname); ranks with the same name share a segment."""
        super().__init__(info, "gloo", timeout_s, host)
        self.pids = [p.pid for p in self.peers]
        self.one_host = len(set(self.hosts)) == 1
        self.enabled = self._wants_segment(required)
        if not self.enabled:
            return
        machine = platform.machine().lower()
        if machine not in TSO_MACHINES:
            self.enabled = False
            why = (f"the shared-memory communicator relies on x86's store order, which {machine} CPUs do not "
                   "guarantee")
            if required:
                raise UserError(f"--comm {self.kind}: {why}; use --comm gloo")
            if self.rank == 0:
                warnings.warn(f"{why}: the ranks talk over gloo instead", RuntimeWarning, stacklevel=2)
            return
        self.backend = "shm"
        self._map_segment([q for q in range(self.world_size) if self.hosts[q] == self.hosts[self.rank]])

    def _wants_segment(self, required: bool) -> bool:
        """Whether to map a segment for this layout of ranks on hosts: only when every rank is on this host."""
        if not self.one_host and required:
            raise UserError(f"--comm shm needs every rank on one host; ranks run on {sorted(set(self.hosts))}")
        return self.one_host

    def _map_segment(self, members: list[int]) -> None:
        """Map one segment shared by `members` (global ranks, ascending, this rank among them), created by the
        first of them. Flags and slots are indexed by the position in `members` (self.me), not the rank."""
        self.members, self.me = members, members.index(self.rank)
        L = len(members)
        flag_bytes = 64 * L
        size = flag_bytes + NOTICE_BYTES * L + 2 * L * SLOT_BYTES
        path = None
        if self.me == 0:
            path = f"/dev/shm/tp_runtime_{uuid.uuid4().hex}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
            os.close(fd)
        path = self.path = self._all_gather_object(path)[members[0]]
        try:
            fd = os.open(path, os.O_RDWR)
            self.mm = mmap.mmap(fd, size)
            os.close(fd)
        finally:
            TorchDistCommunicator.barrier(self)  # every rank has mapped its segment (or failed to)
            if self.me == 0:
                os.unlink(path)  # the mapping lives on; the name is gone
        self.flags = memoryview(self.mm)[:flag_bytes].cast("q")
        self.notices = memoryview(self.mm)[flag_bytes : flag_bytes + NOTICE_BYTES * L]
        self.data = torch.frombuffer(self.mm, dtype=torch.uint8, offset=flag_bytes + NOTICE_BYTES * L).view(
            2, L, SLOT_BYTES)
        self.typed = {}
        self.seq = 0
        self.everyone = list(range(L))

    def _all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    # --- the protocol ---

    def _slots(self, dtype: torch.dtype) -> list:
        """[buffer][member] -> 1-D view of that slot in `dtype` (views made once: indexing costs microseconds)."""
        rows = self.typed.get(dtype)
        if rows is None:
            typed = self.data.view(dtype)  # (2, members, slot elements)
            rows = self.typed[dtype] = [[typed[b, r] for r in self.everyone] for b in range(2)]
        return rows

    def _wait(self, ranks, s: int, spins_per_check: int = SPINS_PER_CHECK) -> None:
        """Spin until the flags of `ranks` (positions in self.members) reach s, with a sched_yield every
        spins_per_check spins (a wait that spans a network trip yields at every look). A wait
        longer than BACKOFF_AFTER_S is no collective in flight but an idle peer (a server between
        requests): then sleep between looks, 1% of the time waited so far and at most MAX_SLEEP_S, so
        an idle rank costs no core. Dead peers and the timeout are checked every LOOK_EVERY_S."""
        flags = self.flags
        spins, start, next_look, sleeping = 0, None, 0.0, False
        while True:
            for r in ranks:
                if flags[r * FLAG_STRIDE] < s:
                    break
            else:
                return
            spins += 1
            if not sleeping and spins % spins_per_check:
                continue
            now = time.monotonic()
            start = start or now
            sleeping = now - start > BACKOFF_AFTER_S
            if now >= next_look:
                next_look = now + LOOK_EVERY_S
                if self._notice() is not None:  # a rank of this host found ranks lost: report them too
                    raise CommError(f"rank {self.rank}: another rank of this host reported lost ranks")
                late = [r for r in ranks if flags[r * FLAG_STRIDE] < s]
                gone = [self.members[r] for r in late if not pid_alive(self.pids[self.members[r]])]
                if gone and any(flags[r * FLAG_STRIDE] < s for r in ranks):  # (it may have posted, then left)
                    raise CommError(f"rank {self.rank}: rank(s) {gone} died during a shared-memory collective")
                if late and now > start + self.timeout_s:
                    late = [self.members[r] for r in late]
                    raise CommError(f"rank {self.rank}: rank(s) {late} did not reach shared-memory collective {s} "
                                    f"within {self.timeout_s:.0f}s")
            if sleeping:
                time.sleep(min(MAX_SLEEP_S, (now - start) * 0.01))
            else:
                os.sched_yield()

    def _begin(self) -> tuple[int, int]:
        self.seq += 1
        s = self.seq
        self._wait(self.everyone, s - 1)
        return s, s & 1

    def _post(self, s: int) -> None:
        self.flags[self.me * FLAG_STRIDE] = s

    def _notice(self):
        if not getattr(self, "enabled", False):
            return None
        for m, rank in enumerate(self.members):
            base = m * NOTICE_BYTES
            n = int.from_bytes(self.notices[base : base + 8], "little")
            if m != self.me and 0 < n <= NOTICE_BYTES - 8:
                return rank, bytes(self.notices[base + 8 : base + 8 + n]).decode(errors="replace")
        return None

    def _post_notice(self, text: str) -> None:
        if not getattr(self, "enabled", False):
            return
        data = text.encode()[: NOTICE_BYTES - 8]
        base = self.me * NOTICE_BYTES
        self.notices[base + 8 : base + 8 + len(data)] = data
        self.notices[base : base + 8] = len(data).to_bytes(8, "little")  # the length last: the text is whole

    # --- collectives ---

    @_guard
    def _all_reduce(self, tensor):
        if not self.enabled:
            return super()._all_reduce(tensor)
        flat = tensor.view(-1)
        slots = self._slots(tensor.dtype)
        total, cap = flat.numel(), slots[0][0].numel()
        for off in range(0, total, cap):
            self._reduce_chunk(flat if total <= cap else flat[off : off + cap], slots)
        return tensor

    def _reduce_chunk(self, part: torch.Tensor, slots) -> None:
        """All-reduce one slot-sized chunk in place (the hierarchical communicator adds the hosts' exchange)."""
        n = part.numel()
        s, b = self._begin()
        rows = [row[:n] for row in slots[b]]  # every rank's slot, this chunk's length
        rows[self.me].copy_(part)
        self._post(s)
        self._wait(self.everyone, s)
        if part.dtype == torch.float32:
            if len(rows) == 2:
                torch.add(rows[0], rows[1], out=part)
            else:
                torch.sum(torch.stack(rows), dim=0, out=part)
        else:
            part.copy_(torch.stack(rows).sum(dim=0, dtype=torch.float32))

    @_guard
    def _all_gather(self, tensor, dim=-1):
        if not self.enabled or not self.one_host or tensor.numel() * tensor.element_size() > SLOT_BYTES:
            return super()._all_gather(tensor, dim)
        n = tensor.numel()
        s, b = self._begin()
        rows = self._slots(tensor.dtype)[b]
        rows[self.rank][:n].copy_(tensor.reshape(-1))
        self._post(s)
        self._wait(self.everyone, s)
        return torch.cat([row[:n].view(tensor.shape) for row in rows], dim=dim)

    @_guard
    def broadcast(self, tensor, src=0):
        if not self.enabled or not self.one_host or tensor.numel() * tensor.element_size() > SLOT_BYTES:
            return super().broadcast(tensor, src)
        n = tensor.numel()
        s, b = self._begin()
        slot = self._slots(tensor.dtype)[b][src][:n]
        if self.rank == src:
            slot.copy_(tensor.reshape(-1))
            self._post(s)
        else:
            self._wait([src], s)
            tensor.copy_(slot.view(tensor.shape))
            self._post(s)
        return tensor

    def close(self):
        if getattr(self, "enabled", False):
            self.typed.clear()
            del self.data, self.flags, self.notices
            try:
                self.mm.close()
            except BufferError:  # a caller still holds a view; the mapping goes with the process
                pass
            self.enabled = False
        super().close()
