"""The communicator: the one place that calls torch.distributed's collectives.

Chosen once at start-up:
    world size 1   -> Communicator: every call returns at once, nothing is initialized
    CUDA           -> NCCL (with a gloo group beside it for Python objects)
    CPU, one host  -> shared memory (shm_comm.py), gloo underneath for set-up and Python objects
(communicator.py's make_communicator chooses)
    CPU, hosts     -> shared memory within each host, one leader per host over TCP (hier_comm.py) when a
                      host has 2+ ranks; gloo when each has one
Every collective has a timeout (the process group's), so a dead rank ends the job instead of
hanging it. A failed collective asks which ranks are lost (liveness.py: each rank's beacon, all-gathered at
start-up) and raises one CommError line that names them and their hosts; a rank that found them leaves that
line for the ranks of its host (shm_comm.py's notices), which then report the same ranks.

Inside a torch.compile'd step the two activation collectives (all_reduce, all_gather) are custom
ops (tp_runtime::all_reduce_, tp_runtime::all_gather), opaque to the compiler, so a compiled decode
step is one graph with the communication in it; outside compiled code they are plain calls.
"""

import datetime
import socket
import time

import torch

from tp_runtime.distributed import liveness
from tp_runtime.distributed.launch import LaunchInfo, rendezvous_address
from tp_runtime.errors import CommError

DEFAULT_TIMEOUT_S = 45


_TRANSPORT_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def is_comm_failure(e: BaseException) -> bool:
    """Whether `e` is a collective's failure (a peer gone, a timeout) rather than a bug: torch's DistError
    family, OS connection and timeout errors, and the plain RuntimeErrors gloo raises for a closed or silent
    peer (their text names the transport)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return type(e) is RuntimeError and any(w in str(e).lower() for w in _TRANSPORT_WORDS)


def _guard(fn):
    """A collective's failure becomes one CommError line naming the lost ranks and their hosts (or, when every
    rank still lives, the rank and the timeout); any other exception is a bug and keeps its type and traceback."""
    op = fn.__name__.lstrip("_")

    def wrapped(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except CommError as e:
            if getattr(e, "final", False):
                raise
            raise self._failure(op, str(e)) from None
        except Exception as e:
            if not is_comm_failure(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self._failure(op, f"rank {self.rank}: {op} failed, another rank died or timed out after "
                                    f"{self.timeout_s:.0f}s ({first})") from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _final(message: str) -> CommError:
    e = CommError(message)
    e.final = True  # diagnosed: an outer guard passes it on as it is
    return e


class Communicator:
    """World size 1: no process group, every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        return [obj]

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait for every rank (timeout_s: this wait's own limit instead of the communicator's)."""

    def close(self) -> None:
        pass


_LIVE: list[Communicator] = []  # communicators by op id, for the custom ops below


@torch.library.custom_op("tp_runtime::all_reduce_", mutates_args=("tensor",))
def _all_reduce_op(tensor: torch.Tensor, comm_id: int) -> None:
    comm = _LIVE[comm_id]
    if not comm.offline:
        comm._all_reduce(tensor)


@torch.library.custom_op("tp_runtime::all_gather", mutates_args=())
def _all_gather_op(tensor: torch.Tensor, comm_id: int, world_size: int, dim: int) -> torch.Tensor:
    comm = _LIVE[comm_id]
    if comm.offline:  # a compile warm-up: the shape, not the data, matters
        return torch.cat([tensor] * world_size, dim=dim)
    return comm._all_gather(tensor, dim)


@_all_gather_op.register_fake
def _(tensor, comm_id, world_size, dim):
    shape = list(tensor.shape)
    shape[dim] *= world_size
    return tensor.new_empty(shape)


class TorchDistCommunicator(Communicator):
    def __init__(self, info: LaunchInfo, backend: str, timeout_s: float = DEFAULT_TIMEOUT_S, host: str | None = None):
        """host: this rank's host name (default: the hostname); ranks with the same name are on one host."""
        import torch.distributed as dist

        self.op_id = len(_LIVE)
        _LIVE.append(self)
        # offline: compiled graphs' collectives do nothing, so each rank can compile (and run its warm-up
        # step) at its own pace; a barrier with a long limit then brings the ranks together again.
        self.offline = False
        self.dist = dist
        self.rank, self.world_size, self.backend = info.rank, info.world_size, backend
        self.timeout_s = timeout_s
        addr, port = rendezvous_address(info)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=info.rank,
                                    world_size=info.world_size, timeout=timeout)
        except Exception as e:
            raise CommError(f"rank {info.rank}: could not join the other {info.world_size - 1} rank(s) at "
                            f"{addr}:{port} within {timeout_s:.0f}s ({str(e).strip().splitlines()[0]})") from None
        # Python objects travel over gloo even when tensors use NCCL.
        self.object_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        self.beacon = liveness.Beacon()
        self.peers: list[liveness.Peer] = [None] * self.world_size  # every rank's, in rank order
        dist.all_gather_object(self.peers, self.beacon.peer(host or socket.gethostname()), group=self.object_group)
        self.hosts = [p.host for p in self.peers]

    def all_reduce(self, tensor):
        if torch.compiler.is_compiling():
            torch.ops.tp_runtime.all_reduce_(tensor, self.op_id)
            return tensor
        return self._all_reduce(tensor)

    def all_gather(self, tensor, dim=-1):
        if torch.compiler.is_compiling():
            return torch.ops.tp_runtime.all_gather(tensor, self.op_id, self.world_size, dim)
        return self._all_gather(tensor, dim)

    @_guard
    def _all_reduce(self, tensor):
        self.dist.all_reduce(tensor)
        return tensor

    @_guard
    def _all_gather(self, tensor, dim=-1):
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=dim)

    @_guard
    def broadcast(self, tensor, src=0):
        self.dist.broadcast(tensor, src)
        return tensor

    @_guard
    def broadcast_object(self, obj, src=0):
        box = [obj]
        self.dist.broadcast_object_list(box, src=src, group=self.object_group)
        return box[0]

    @_guard
    def all_gather_object(self, obj):
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.object_group)
        return out

    @_guard
    def barrier(self, timeout_s=None):
        if timeout_s is not None:  # a counter in the rendezvous store, polled: any limit, any backend
            self._store_barrier(timeout_s)
        elif self.object_group is not None:
            self.dist.barrier(group=self.object_group)
        else:
            self.dist.barrier()

    def _failure(self, op: str, message: str) -> CommError:
        """The one line for a failed `op`: the lost ranks as a rank of this host found them (a notice), else as
        this rank's probe finds them (then left as a notice for the others), else `message`."""
        seen = self._notice()
        if seen is not None:
            by, text = seen
            return _final(f"rank {self.rank}: {text} (during {op}, seen by rank {by})")
        peers = getattr(self, "peers", None)
        lost = liveness.find_lost(peers, self.rank, min(liveness.PROBE_S, self.timeout_s)) if peers else {}
        if not lost:
            return _final(message)
        text = liveness.describe(lost, peers)
        self._post_notice(text)
        return _final(f"rank {self.rank}: {text} (during {op})")

    def _notice(self) -> tuple[int, str] | None:
        """(rank, what it found lost) left by another rank of this host; none without shared memory."""
        return None

    def _post_notice(self, text: str) -> None:
        """Leave `text` for the other ranks of this host (shared memory only)."""

    def _subgroup(self, ranks: list[int]):
        """A gloo group of `ranks`; every rank of the world must call this, in the same order."""
        return self.dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))

    def _all_gather_into(self, parts: list[torch.Tensor], tensor: torch.Tensor, group) -> None:
        """`group`'s tensors into `parts`, in the group's rank order (called by the group's members only)."""
        self.dist.all_gather(parts, tensor, group=group)

    def _store_barrier(self, timeout_s: float) -> None:
        store = self.dist.distributed_c10d._get_default_store()
        self._barriers = getattr(self, "_barriers", 0) + 1
        key = f"tp_runtime/barrier/{self._barriers}"
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while int(store.add(key, 0)) < self.world_size:
            if time.monotonic() > deadline:
                raise CommError(f"rank {self.rank}: the other ranks did not reach the barrier within {timeout_s:.0f}s")
            time.sleep(0.05)

    def close(self):
        if getattr(self, "beacon", None) is not None:
            self.beacon.close()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
