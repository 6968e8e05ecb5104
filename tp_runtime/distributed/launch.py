"""Launch glue: who am I (rank, world size, local rank) and where do the ranks meet.

The only module that reads launcher environment variables:
    torchrun        RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    Ray             torchrun's variables, set by ray_cluster.py in each actor, plus TP_RUNTIME_LAUNCHER=ray and
                    TP_RUNTIME_RANK_CPUS (the CPUs of the rank's placement-group bundle: its default thread count)
    Open MPI        OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
    MPICH (Hydra)   PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
Under MPI the rendezvous address is agreed over MPI (mpi4py, the `mpi` extra): rank 0 picks a free
port and broadcasts it. Without mpi4py, MASTER_ADDR/MASTER_PORT from the environment are used, or,
when every rank is on this host, an address derived from the MPI job's own identifiers.
"""

import hashlib
import os
import socket
from dataclasses import dataclass

from tp_runtime.errors import UserError


@dataclass(frozen=True)
class LaunchInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # none | torchrun | ray | openmpi | mpich
    cpus: int | None = None  # CPUs the launcher granted this rank (Ray's bundle), when it says

    @property
    def is_mpi(self) -> bool:
        return self.launcher in ("openmpi", "mpich")


def _int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def detect_launch() -> LaunchInfo:
    env = os.environ
    if "OMPI_COMM_WORLD_SIZE" in env:
        size = _int("OMPI_COMM_WORLD_SIZE")
        return LaunchInfo(_int("OMPI_COMM_WORLD_RANK", 0), size, _int("OMPI_COMM_WORLD_LOCAL_RANK", 0),
                          _int("OMPI_COMM_WORLD_LOCAL_SIZE", size), "openmpi")
    if "PMI_SIZE" in env and "PMI_RANK" in env:
        size = _int("PMI_SIZE")
        return LaunchInfo(_int("PMI_RANK", 0), size, _int("MPI_LOCALRANKID", _int("PMI_RANK", 0)),
                          _int("MPI_LOCALNRANKS", size), "mpich")
    if "WORLD_SIZE" in env and "RANK" in env:
        size = _int("WORLD_SIZE")
        if env.get("TP_RUNTIME_LAUNCHER") == "ray":
            return LaunchInfo(_int("RANK", 0), size, _int("LOCAL_RANK", 0), _int("LOCAL_WORLD_SIZE", size), "ray",
                              _int("TP_RUNTIME_RANK_CPUS"))
        return LaunchInfo(_int("RANK", 0), size, _int("LOCAL_RANK", 0), _int("LOCAL_WORLD_SIZE", size), "torchrun")
    return LaunchInfo()


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_address(info: LaunchInfo) -> tuple[str, int]:
    """The (address, port) of rank 0's TCP store, agreed by every rank."""
    env = os.environ
    if info.launcher in ("torchrun", "ray") or ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise UserError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; start with torchrun")
        return env["MASTER_ADDR"], _int("MASTER_PORT")
    if info.is_mpi:
        try:
            from mpi4py import MPI
        except ImportError:
            return _derived_address(info)
        comm = MPI.COMM_WORLD
        hosts = comm.allgather(socket.gethostname())
        if info.rank == 0:
            addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
            found = (addr, free_port())
        else:
            found = None
        return comm.bcast(found, root=0)
    return "127.0.0.1", free_port()


def _derived_address(info: LaunchInfo) -> tuple[str, int]:
    if info.local_world_size != info.world_size:
        raise UserError(
            "ranks span several hosts and mpi4py is not installed: install the `mpi` extra "
            "(pip install 'tp_runtime[mpi]') or export MASTER_ADDR and MASTER_PORT to every rank"
        )
    job = "|".join(os.environ.get(k, "") for k in ("PMI_PORT", "PMI_FD", "PMI_ID", "OMPI_MCA_ess_base_jobid",
                                                     "OMPI_MCA_orte_hnp_uri", "PMIX_NAMESPACE"))
    if not job.strip("|"):
        raise UserError("cannot agree on a rendezvous port without mpi4py; export MASTER_ADDR and MASTER_PORT")
    port = 20000 + int(hashlib.sha1(job.encode()).hexdigest(), 16) % 20000
    return "127.0.0.1", port
