"""make_communicator: the one communicator of a rank, chosen at start-up from the device and the hosts."""

import torch

from tp_runtime.distributed.comm import DEFAULT_TIMEOUT_S, Communicator, TorchDistCommunicator
from tp_runtime.distributed.hier_comm import HierarchicalCommunicator
from tp_runtime.distributed.launch import LaunchInfo
from tp_runtime.distributed.shm_comm import ShmCommunicator
from tp_runtime.errors import UserError

COMM_KINDS = ("auto", "shm", "hier", "gloo")


def make_communicator(info: LaunchInfo, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                      kind: str = "auto") -> Communicator:
    """kind: auto (NCCL on CUDA; on CPUs shared memory when every rank is on one host, hierarchical when the
    ranks span hosts: shared memory within a host, one leader per host over TCP), shm (shared memory, an error
    if the ranks span hosts), hier (hierarchical, an error where it cannot serve), gloo."""
    if kind not in COMM_KINDS:
        raise UserError(f"--comm must be one of {', '.join(COMM_KINDS)}, got {kind!r}")
    if info.world_size == 1:
        return Communicator()
    if device.type == "cuda":
        return TorchDistCommunicator(info, "nccl", timeout_s)
    if kind == "gloo":
        return TorchDistCommunicator(info, "gloo", timeout_s)
    if kind == "shm":
        return ShmCommunicator(info, timeout_s, required=True)
    return HierarchicalCommunicator(info, timeout_s, required=kind == "hier")
