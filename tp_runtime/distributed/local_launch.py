"""Launch glue for `--launcher local`: start the tp_size ranks of a job as subprocesses of this one.

Each child gets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), with any MPI launcher variables of this process removed so the children
do not take themselves for MPI ranks. The children run in their own session: a Ctrl-C or SIGTERM
reaches this process, which passes it to rank 0 alone (rank 0 then tells the others to stop), and
the children receive SIGTERM if this process dies.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

from tp_runtime.distributed.launch import free_port

PR_SET_PDEATHSIG = 1
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "HYDRA_")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _die_with_parent():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def rank_env(rank: int, world_size: int, port: int, base: dict | None = None) -> dict:
    env = {k: v for k, v in (base or os.environ).items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in TORCHRUN_VARS}
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def launch_local(world_size: int, cmd: list[str], grace_s: float = 30.0) -> int:
    """Run `cmd` as world_size ranks on this host and wait for them. Returns the first non-zero exit
    status (0 when every rank exits cleanly). Once a rank fails or rank 0 ends, the others get grace_s
    to leave before they are killed."""
    port = free_port()
    procs = [subprocess.Popen(cmd, env=rank_env(r, world_size, port), start_new_session=True,
                              preexec_fn=_die_with_parent) for r in range(world_size)]

    def forward(sig, frame):
        if procs[0].poll() is None:
            procs[0].send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = None
        while any(p.poll() is None for p in procs):
            ended = [p for p in procs if p.poll() is not None]
            if deadline is None and (procs[0] in ended or any(p.returncode for p in ended)):
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        print(f"[tp-serve] rank {procs.index(p)} did not stop within {grace_s:.0f}s; killing it",
                              file=sys.stderr, flush=True)
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return next((p.returncode for p in procs if p.returncode), 0)
