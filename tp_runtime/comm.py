"""The communicator: the one place that calls torch.distributed's collectives.

Chosen once at start-up:
    world size 1   -> Communicator: every call returns at once, nothing is initialized
    CUDA           -> NCCL (with a gloo group beside it for Python objects)
    CPU            -> gloo (a shared-memory communicator for ranks on one host comes later,
                      behind this same interface)
Every collective has a timeout (the process group's), so a dead rank ends the job instead of
hanging it.
"""

import datetime

import torch

from tp_runtime.launch import LaunchInfo, rendezvous_address

DEFAULT_TIMEOUT_S = 45


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

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchDistCommunicator(Communicator):
    def __init__(self, info: LaunchInfo, backend: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size, self.backend = info.rank, info.world_size, backend
        addr, port = rendezvous_address(info)
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=info.rank,
                                world_size=info.world_size, timeout=timeout)
        # Python objects travel over gloo even when tensors use NCCL.
        self.object_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None

    def all_reduce(self, tensor):
        self.dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor, dim=-1):
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor, src=0):
        self.dist.broadcast(tensor, src)
        return tensor

    def broadcast_object(self, obj, src=0):
        box = [obj]
        self.dist.broadcast_object_list(box, src=src, group=self.object_group)
        return box[0]

    def barrier(self):
        if self.object_group is not None:
            self.dist.barrier(group=self.object_group)
        else:
            self.dist.barrier()

    def close(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def make_communicator(info: LaunchInfo, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Communicator:
    if info.world_size == 1:
        return Communicator()
    return TorchDistCommunicator(info, "nccl" if device.type == "cuda" else "gloo", timeout_s)
