"""make_communicator: the one communicator of a rank, chosen at start-up from the device and the hosts."""

import torch

from tp_runtime.distributed.comm import DEFAULT_TIMEOUT_S, Communicator, TorchDistCommunicator
from tp_runtime.distributed.launch import LaunchInfo
from tp_runtime.distributed.shm_comm import ShmCommunicator
from tp_runtime.errors import UserError

COMM_KINDS = ("auto", "shm", "gloo")


def make_communicator(info: LaunchInfo, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                      kind: str = "auto") -> Communicator:
    """kind: auto (shared memory when every rank is on this host's CPUs, else gloo; NCCL on CUDA),
    shm (shared memory, an error if the ranks span hosts), gloo."""
    if kind not in COMM_KINDS:
        raise UserError(f"--comm must be one of {', '.join(COMM_KINDS)}, got {kind!r}")
    if info.world_size == 1:
        return Communicator()
    if device.type == "cuda":
        return TorchDistCommunicator(info, "nccl", timeout_s)
    if kind == "gloo":
        return TorchDistCommunicator(info, "gloo", timeout_s)
    return ShmCommunicator(info, timeout_s, required=kind == "shm")
