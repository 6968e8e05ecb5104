"""Core and NUMA binding of CPU ranks: which cores each local rank runs on, decided before weights load.

    --bind numa    local rank r gets the cores of NUMA node r (as many nodes as local ranks needed);
                   weights are loaded after binding, so first-touch puts them in that node's memory
    --bind cores   the cores this process may use, split into even contiguous slices, one per local rank
    --bind none    no binding (threads still default to cores / local ranks)
    --bind auto    numa when the host has at least as many NUMA nodes as local ranks (and more than one),
                   else cores when there are several local ranks and a core for each, else none

`plan_binding` is a pure function of the topology, so the rules are tested on described machines (two
nodes, uneven nodes) as well as on this one. torch threads = the rank's cores minus --reserve_cores.
"""

import glob
import os
from dataclasses import dataclass

from tp_runtime.errors import UserError

MODES = ("auto", "numa", "cores", "none")


@dataclass(frozen=True)
class Binding:
    local_rank: int
    cores: tuple[int, ...]
    node: int | None  # NUMA node, when bound to one
    threads: int
    mode: str  # what was applied: numa | cores | none

    def describe(self) -> str:
        where = f"node {self.node}, " if self.node is not None else ""
        cores = _ranges(self.cores) if self.mode != "none" else "unbound"
        return f"local rank {self.local_rank}: {where}cores {cores}, {self.threads} thread(s)"


def _ranges(cores) -> str:
    out, run = [], []
    for c in sorted(cores):
        if run and c == run[-1] + 1:
            run.append(c)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def read_numa_nodes() -> dict[int, tuple[int, ...]]:
    """node -> its cpus, from sysfs; one node holding every cpu when sysfs has none."""
    nodes = {}
    for path in sorted(glob.glob("/sys/devices/system/node/node[0-9]*/cpulist")):
        node = int(path.split("/node")[-1].split("/")[0])
        with open(path) as f:
            cpus = _parse_cpulist(f.read().strip())
        if cpus:
            nodes[node] = cpus
    return nodes or {0: tuple(sorted(os.sched_getaffinity(0)))}


def _parse_cpulist(text: str) -> tuple[int, ...]:
    cpus = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        cpus += range(int(a), int(b or a) + 1)
    return tuple(cpus)


def plan_binding(allowed: tuple[int, ...], nodes: dict[int, tuple[int, ...]], local_rank: int, local_world: int,
                 mode: str = "auto", reserve_cores: int = 0, threads: int | None = None) -> Binding:
    if mode not in MODES:
        raise UserError(f"--bind must be one of {', '.join(MODES)}, got {mode!r}")
    allowed = tuple(sorted(allowed))
    usable = {n: tuple(c for c in cpus if c in allowed) for n, cpus in nodes.items()}
    usable = {n: cpus for n, cpus in usable.items() if cpus}
    if mode == "auto":
        if len(usable) > 1 and len(usable) >= local_world:
            mode = "numa"
        else:  # more ranks than cores (oversubscribed): leave them unbound
            mode = "cores" if 1 < local_world <= len(allowed) else "none"
    node = None
    if mode == "numa":
        if len(usable) < local_world:
            raise UserError(f"--bind numa needs a NUMA node per local rank: {local_world} ranks, "
                            f"{len(usable)} node(s) with usable cores; use --bind cores")
        node = sorted(usable)[local_rank]
        cores = usable[node]
    elif mode == "cores":
        if len(allowed) < local_world:
            raise UserError(f"--bind cores needs a core per local rank: {local_world} ranks, {len(allowed)} core(s)")
        base, extra = divmod(len(allowed), local_world)
        start = local_rank * base + min(local_rank, extra)
        cores = allowed[start : start + base + (1 if local_rank < extra else 0)]
    else:
        cores = allowed
    if threads is None:
        own = len(cores) if mode != "none" else max(1, len(allowed) // local_world)
        threads = max(1, own - reserve_cores)
    return Binding(local_rank, cores, node, threads, mode)


def apply_binding(b: Binding) -> None:
    if b.mode != "none":
        os.sched_setaffinity(0, b.cores)
