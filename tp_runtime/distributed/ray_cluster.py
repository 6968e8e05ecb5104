"""Ray launch glue: the ranks of one engine as Ray actors, one per bundle of a placement group.

    placement group  one bundle per rank: {"CPU": c} on CPU (c = torch threads of the rank), {"CPU": 1, "GPU": 1}
                     on CUDA; --placement pack -> STRICT_PACK (every rank on one node), spread -> STRICT_SPREAD (one
                     rank per node) when enough nodes can each hold a bundle, else SPREAD (across nodes, best effort).
                     Readiness has a timeout; a cluster that can never fit the group is refused at once.
    actors           one per rank, pinned to its bundle. Every actor reports its node; rank 0's publishes its
                     address and a free port; every actor then gets torchrun's variables (RANK, WORLD_SIZE,
                     LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so tp_runtime.distributed.launch and the
                     communicator's rendezvous work as they do under torchrun, and TP_RUNTIME_LAUNCHER=ray with
                     the bundle's CPU count, which launch.py turns into the rank's default thread count.
    launch_ranks     runs entry(argv) in every actor, returns their results (rank 0's first), removes the group
    RankGroup        the same actors kept alive: start(factory, ...) builds one object per rank (an LLM), then
                     call(method, ...) runs a method of it on every rank in lockstep (RayEngine, ray_engine.py)

A rank that fails ends the call: the driver stops the other actors at once (they would otherwise leave
within the communicator's timeout) and raises, naming the rank: UserError for a user's mistake found by a
rank, CommError when a rank's process died, naming its node (host name and address) and whether Ray has
declared that node dead (`ray stop` there, its raylet killed, the machine gone). The group is then shut down;
a new one can start on the nodes left (--tp_size re-slices the engine to fit fewer resources).
The only module besides launch.py that knows Ray; `import tp_runtime` never imports it.
"""

import io
import os
import socket
import sys
import threading
import time

from tp_runtime.distributed import launch
from tp_runtime.errors import UserError

PLACEMENTS = {"pack": "STRICT_PACK", "spread": "SPREAD"}  # spread becomes STRICT_SPREAD where it can: strategy()
DEFAULT_PLACEMENT_TIMEOUT_S = 60.0
GRACE_S = 2.0  # after a rank fails, how long the others get to report their own error before they are stopped
NODE_DEATH_WAIT_S = 5.0  # after an actor died: how long to wait for Ray to say whether its node died too


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("the Ray launcher needs Ray: pip install 'tp_runtime[ray]'") from None
    return ray


def connect(address: str | None = None) -> bool:
    """Join a Ray cluster unless this process already has. address: None = Ray's own rule (RAY_ADDRESS, else the
    cluster last started on this machine, else a new local one), "auto" = an existing one, "local" = a new local
    one, "host:port" = that one. Returns True when this call connected (the caller then disconnects)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    given = address if address not in (None, "auto", "local") else os.environ.get("RAY_ADDRESS")
    if address != "local" and given and "://" not in given and not _reachable(given):
        # ray.init would retry an unreachable GCS for minutes
        raise UserError(f"no Ray cluster answers at {given} (nothing listens there); start one with "
                        "`ray start --head`, or leave out --ray_address for a local one")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with `ray start --head`, "
                        "or leave out --ray_address for a local one") from None
    return True


def _reachable(address: str, timeout_s: float = 5.0) -> bool:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port: let Ray judge it
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


# --- inside each actor ---


class _Capture(io.TextIOBase):
    """Collects what a rank prints so the driver can write it out as it comes, without Ray's log prefixes."""

    def __init__(self, stream: str):
        self.stream, self.parts, self.lock = stream, [], threading.Lock()

    def writable(self):
        return True

    def write(self, text):
        with self.lock:
            self.parts.append(text)
        return len(text)

    def isatty(self):
        return False

    def drain(self) -> str:
        with self.lock:
            out, self.parts = "".join(self.parts), []
        return out


class RankActor:
    """One rank. Wrapped with ray.remote by RankGroup; threaded (2 calls at once) so the driver can drain the
    rank's output while its entry point runs."""

    def __init__(self):
        self.obj = None
        self.out, self.err = _Capture("stdout"), _Capture("stderr")

    def node(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])], "pid": os.getpid()}

    def free_port(self) -> int:
        return launch.free_port()  # on this actor's node

    def setup(self, env: dict, cwd: str, capture: bool) -> None:
        os.environ.update(env)
        if os.path.isdir(cwd):  # the driver's directory, so relative paths in argv mean the same here
            os.chdir(cwd)
        if capture:
            sys.stdout, sys.stderr = self.out, self.err

    def drain(self) -> tuple[str, str]:
        return self.out.drain(), self.err.drain()

    def run(self, entry, argv):
        """entry(argv); a console-script main is run unwrapped so its errors reach the driver as exceptions."""
        fn = getattr(entry, "__wrapped__", entry)
        try:
            return fn(argv)
        except SystemExit as e:  # argparse and sys.exit: a status, not the end of the actor
            return e.code

    def start(self, factory, args, kwargs) -> None:
        self.obj = factory(*args, **kwargs)

    def call(self, method: str, args, kwargs):
        return getattr(self.obj, method)(*args, **kwargs)

    def attr(self, name: str):
        return getattr(self.obj, name)


# --- on the driver ---


def _bundle(use_gpu: bool, cpus: int) -> dict:
    return {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": cpus}


def _check_fits(ray, tp_size: int, bundle: dict, placement: str) -> None:
    """Refuse at once a group that this cluster can never hold (busy resources are waited for instead)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {k: v * tp_size for k, v in bundle.items()}
    what = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    if placement == "pack":
        if not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            biggest = max((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes) if nodes else (0, 0)
            raise UserError(f"tp_size={tp_size} needs {tp_size} x ({what}) on one node (--placement pack), but the "
                            f"largest node of the Ray cluster has {biggest[0]:g} CPU and {biggest[1]:g} GPU; "
                            f"lower --threads, use --placement spread, or add resources")
    else:
        total = {k: sum(n.get(k, 0) for n in nodes) for k in bundle}
        fits = sum(min(int(n.get(k, 0) // v) for k, v in bundle.items()) for n in nodes)
        if fits < tp_size:
            have = ", ".join(f"{v:g} {k}" for k, v in total.items())
            raise UserError(f"tp_size={tp_size} needs {tp_size} x ({what}), but the Ray cluster has {have} in all "
                            f"({fits} bundle(s) fit); lower --threads or add resources")


def strategy(ray, tp_size: int, bundle: dict, placement: str) -> str:
    """The placement group's strategy: pack -> STRICT_PACK; spread -> STRICT_SPREAD (one rank per node) when at
    least tp_size alive nodes can each hold a bundle, else SPREAD (ranks share nodes, as few per node as Ray can)."""
    if placement == "pack":
        return "STRICT_PACK"
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    holders = sum(all(n.get(k, 0) >= v for k, v in bundle.items()) for n in nodes)
    return "STRICT_SPREAD" if holders >= tp_size else "SPREAD"


def default_cpus_per_rank(ray, tp_size: int, placement: str) -> int:
    """The CPUs of one rank when not given: pack shares the largest node among the ranks; spread shares the
    cluster, but no rank gets more than a node."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1]
    if placement == "pack":
        return max(1, max(cpus) // tp_size)
    return max(1, min(max(cpus), sum(cpus) // tp_size))


def local_ranks(nodes: list[dict], use_gpu: bool) -> list[tuple[int, int]]:
    """(local rank, local world size) of every rank: ranks on one node are numbered by GPU id on CUDA (so
    LOCAL_RANK indexes the node's CUDA_VISIBLE_DEVICES), else by rank."""
    out = [None] * len(nodes)
    for node_id in {n["node_id"] for n in nodes}:
        here = [r for r, n in enumerate(nodes) if n["node_id"] == node_id]
        if use_gpu:
            here.sort(key=lambda r: [int(g) if g.isdigit() else g for g in nodes[r]["gpu_ids"]])
        for i, r in enumerate(here):
            out[r] = (i, len(here))
    return out


class RankGroup:
    """tp_size actors in one placement group, each with torchrun's variables for its rank.

    use_gpu: one GPU per rank (None: when the cluster has GPUs); cpus_per_rank: CPUs per rank on CPU (default: default_cpus_per_rank).
    capture: rank 0's output is collected in the actor and written out by the driver (for console scripts)."""

    def __init__(self, tp_size: int, placement: str = "pack", address: str | None = None, use_gpu: bool | None = None,
                 cpus_per_rank: int | None = None, placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
                 capture: bool = False, env: dict | None = None):
        if placement not in PLACEMENTS:
            raise UserError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if tp_size < 1:
            raise UserError(f"tp_size must be >= 1, got {tp_size}")
        if cpus_per_rank is not None and cpus_per_rank < 1:
            raise UserError(f"CPUs per rank must be >= 1, got {cpus_per_rank}")
        self.ray = ray = import_ray()
        self.tp_size, self.capture = tp_size, capture
        self.actors, self.pg = [], None
        self.lock = threading.RLock()  # one call at a time: every rank must run the same calls in the same order
        self.connected = connect(address)
        try:
            self._start(placement, use_gpu, cpus_per_rank, placement_timeout_s, env or {})
        except BaseException:
            self.shutdown()
            raise

    def _start(self, placement, use_gpu, cpus, timeout_s, env):
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        t0 = time.perf_counter()
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        cpus = 1 if use_gpu else (cpus or default_cpus_per_rank(ray, self.tp_size, placement))
        bundle = _bundle(use_gpu, cpus)
        _check_fits(ray, self.tp_size, bundle, placement)
        self.strategy = strategy(ray, self.tp_size, bundle, placement)
        self.pg = placement_group([dict(bundle) for _ in range(self.tp_size)], strategy=self.strategy)
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"the Ray cluster did not grant {self.tp_size} x {bundle} ({self.strategy}) "
                            f"within {timeout_s:g}s: its resources are busy (available: "
                            f"{_short(ray.available_resources())}); free them or raise the timeout") from None
        self.cpus_per_rank, self.use_gpu = cpus, use_gpu
        remote = ray.remote(RankActor)
        self.actors = [
            remote.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_concurrency=2,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)).remote()
            for r in range(self.tp_size)
        ]
        self.nodes = self._gather(lambda: [a.node.remote() for a in self.actors], "start")
        addr, port = self.nodes[0]["ip"], self._gather(lambda: [self.actors[0].free_port.remote()], "start")[0]
        gpus_by_node = {}
        for n in self.nodes:
            gpus_by_node.setdefault(n["node_id"], []).extend(n["gpu_ids"])
        envs = []
        for r, (local_rank, local_world) in enumerate(local_ranks(self.nodes, use_gpu)):
            rank_env = dict(env, RANK=str(r), WORLD_SIZE=str(self.tp_size), LOCAL_RANK=str(local_rank),
                            LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR=addr, MASTER_PORT=str(port),
                            TP_RUNTIME_LAUNCHER="ray", TP_RUNTIME_RANK_CPUS=str(bundle["CPU"]),
                            OMP_NUM_THREADS=str(bundle["CPU"]))
            if use_gpu:  # every rank of a node sees the node's GPUs of this group, so NCCL can reach its peers
                ids = sorted(gpus_by_node[self.nodes[r]["node_id"]], key=lambda g: int(g) if g.isdigit() else g)
                rank_env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            envs.append(rank_env)
        cwd = os.getcwd()
        self._gather(lambda: [a.setup.remote(e, cwd, self.capture and r == 0)
                              for r, (a, e) in enumerate(zip(self.actors, envs))], "start")
        self.master = (addr, port)
        self.start_s = time.perf_counter() - t0
        if self.capture:  # a console script's driver: say where the ranks run
            where = ", ".join(f"rank {r} on {n['host']} ({n['ip']})" for r, n in enumerate(self.nodes))
            print(f"[tp_runtime] Ray placement {self.strategy}: {where}", file=sys.stderr, flush=True)

    # --- running on every rank ---

    def _gather(self, submit, what: str) -> list:
        """Results of one call per rank, in rank order. When every rank raises a UserError (LLM checks a request
        alike on every rank) it is raised and the ranks stay up; any other failure stops them all (module doc)."""
        with self.lock:  # submitted and awaited under the lock, so the ranks see the calls in one order
            return self._wait(submit(), what)

    def _wait(self, refs: list, what: str) -> list:
        ray = self.ray
        index = {ref: r for r, ref in enumerate(refs)}
        results, failures = {}, {}
        pending = list(refs)
        deadline = None
        while pending:
            timeout = 0.2 if self.capture else (None if deadline is None else max(0.0, deadline - time.monotonic()))
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            self._forward_output()
            for ref in done:
                r = index[ref]
                try:
                    results[r] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failures[r] = e
                    deadline = deadline or time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._forward_output()
        if not failures:
            return [results[r] for r in range(len(refs))]
        agreed = len(failures) == len(refs) and all(isinstance(getattr(e, "cause", None), UserError)
                                                    for e in failures.values())
        if agreed:  # every rank refused the same request: the engine is intact
            raise UserError(str(failures[0].cause))
        error = _rank_failure(ray, what, failures, getattr(self, "nodes", None))
        self.shutdown()  # a rank is gone, or the ranks no longer agree: stop them all
        raise error

    def _forward_output(self):
        if not self.capture or not self.actors:
            return
        try:
            out, err = self.ray.get(self.actors[0].drain.remote(), timeout=5)
        except Exception:  # rank 0 is gone: its failure is reported by _gather
            return
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
        if err:
            sys.stderr.write(err)
            sys.stderr.flush()

    def run(self, entry, argv: list[str]) -> list:
        """entry(argv) on every rank (entry must be importable where the actors run); returns the results."""
        return self._gather(lambda: [a.run.remote(entry, list(argv)) for a in self.actors], "run")

    def start(self, factory, *args, **kwargs) -> None:
        """obj = factory(*args, **kwargs) on every rank, kept in the actor for call()."""
        self._gather(lambda: [a.start.remote(factory, args, kwargs) for a in self.actors], "start")

    def call(self, method: str, *args, **kwargs) -> list:
        """obj.method(*args, **kwargs) on every rank at once; the results in rank order."""
        if not self.actors:
            raise UserError("the Ray ranks were shut down (after a failure or shutdown()); start a new engine")
        return self._gather(lambda: [a.call.remote(method, args, kwargs) for a in self.actors], method)

    def attr(self, name: str, rank: int = 0):
        """An attribute of rank `rank`'s object."""
        if not self.actors:
            raise UserError("the Ray ranks were shut down (after a failure or shutdown()); start a new engine")
        return self._gather(lambda: [self.actors[rank].attr.remote(name)], name)[0]

    def shutdown(self) -> None:
        """Stop the actors, remove the placement group, and leave a cluster this group joined."""
        ray = self.ray
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self.connected:
            ray.shutdown()
            self.connected = False


def _short(resources: dict) -> str:
    return ", ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if k in resources) or "none"


def _node_state(ray, node_id: str, wait_s: float = NODE_DEATH_WAIT_S) -> bool:
    """Whether Ray has declared the node dead, waiting up to wait_s for its verdict (a stopped raylet
    unregisters at once; a killed one is found by the GCS's health checks)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            dead = any(n.get("NodeID") == node_id and not n.get("Alive") for n in ray.nodes())
        except Exception:  # the GCS itself is gone
            return False
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.5)


def _rank_failure(ray, what: str, failures: dict, nodes: list[dict] | None = None) -> Exception:
    """The error to raise on the driver: the lowest rank's own error, preferring a user's mistake; a dead actor
    is named with its node (nodes: each rank's, from RankActor.node)."""
    from tp_runtime.errors import CommError

    for r in sorted(failures):
        cause = getattr(failures[r], "cause", None)
        if isinstance(cause, UserError):
            return UserError(f"rank {r}: {cause}")
    for r in sorted(failures):
        e = failures[r]
        if isinstance(e, ray.exceptions.RayActorError):
            first = str(e).strip().splitlines()[0]
            if not nodes:
                return CommError(f"rank {r} died during {what} (its Ray actor is gone: {first}); the other ranks "
                                 "were stopped")
            node = nodes[r]
            dead = _node_state(ray, node["node_id"])
            where = f"node {node['host']} ({node['ip']})"
            return CommError(f"rank {r} on {where} died during {what}: "
                             + (f"Ray declared {where} dead" if dead else f"its Ray actor is gone ({first})")
                             + "; the other ranks were stopped")
    for r in sorted(failures):
        cause = getattr(failures[r], "cause", None)
        if isinstance(cause, CommError):
            return CommError(str(cause))
    r = min(failures)
    return failures[r]


def launch_ranks(tp_size: int, entry, argv: list[str], placement: str = "pack", address: str | None = None,
                 use_gpu: bool | None = None, cpus_per_rank: int | None = None,
                 placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S, capture: bool = True) -> list:
    """Run entry(argv) as tp_size ranks of Ray actors, as torchrun would start them; returns each rank's
    result, rank 0's first. The actors and the placement group are gone when it returns."""
    group = RankGroup(tp_size, placement, address, use_gpu, cpus_per_rank, placement_timeout_s, capture)
    try:
        return group.run(entry, argv)
    finally:
        group.shutdown()
