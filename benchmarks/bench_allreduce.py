"""All-reduce latency between CPU ranks: the shared-memory communicator against gloo on one host, and, with
--hosts, the hierarchical communicator across hosts.

One host: two processes (or --world), 1 thread each, fp32, sizes 576 / 2048 / 8192 / 49152 / 1M floats; for
each backend and size, 200 warm-up calls then --iters timed calls; median and p90 in microseconds.

--hosts (Linux, root): two hosts made of network namespaces (launch/netns_hosts.sh, brought up and down here
unless they are up already), hidden-size vectors (576, 2048, 6144 floats), at 2 hosts x 2 ranks and 2 x 1:
the hierarchical all-reduce (leaders over TcpLink, and over a gloo group of the leaders), gloo across the
hosts, and the floor: a plain TCP ping-pong of the same bytes between the two hosts (one round trip).

    .venv/bin/python benchmarks/bench_allreduce.py [--world 2] [--iters 2000] [--out FILE]
    .venv/bin/python benchmarks/bench_allreduce.py --hosts [--iters 2000] [--out FILE]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

SIZES = (576, 2048, 8192, 49152, 1 << 20)
HIDDEN_SIZES = (576, 2048, 6144)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RIG = os.path.join(REPO, "launch", "netns_hosts.sh")
RSH = os.path.join(REPO, "launch", "netns-rsh")
HOSTS = ("tphost0", "tphost1")


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_us": statistics.median(times), "p90_us": times[int(0.9 * len(times))]}


def worker(kind: str, iters: int, out: str) -> None:
    import torch

    from tp_runtime.distributed.communicator import make_communicator
    from tp_runtime.distributed.hier_comm import HierarchicalCommunicator
    from tp_runtime.distributed.launch import detect_launch

    torch.set_num_threads(1)
    if kind.startswith("hier"):  # hier (leaders over TCP) or hier_gloo (leaders over a gloo group)
        link = "gloo" if kind == "hier_gloo" else "tcp"
        comm = HierarchicalCommunicator(detect_launch(), 60, required=True, leader_link=link)
        sizes = HIDDEN_SIZES
    else:
        comm = make_communicator(detect_launch(), torch.device("cpu"), 60, kind)
        sizes = HIDDEN_SIZES if kind == "gloo" and len(set(comm_hosts(comm))) > 1 else SIZES
    results = {}
    for n in sizes:
        x = torch.ones(n)
        reps = iters if n < 100_000 else max(50, iters // 20)
        for _ in range(200 if n < 100_000 else 10):
            comm.all_reduce(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            comm.all_reduce(x)
            times.append((time.perf_counter() - t) * 1e6)
        results[n] = summary(times)
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"backend": comm.backend, "results": results}, f)
    comm.close()


def comm_hosts(comm) -> list[str]:
    """Every rank's hostname (gloo's communicator does not keep them)."""
    return comm.all_gather_object(socket.gethostname())


def launch(kind: str, world: int, iters: int, out: str) -> dict:
    from tp_runtime.distributed.launch import free_port

    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", kind, str(iters), out], env=env))
    if any(p.wait() for p in procs):
        raise SystemExit(f"{kind} run failed")
    with open(out) as f:
        return json.load(f)


# --- across hosts ---


def ping_pong(role: str, port: int, iters: int, out: str) -> None:
    """The floor: one client, one echo server, a TCP_NODELAY round trip of n floats' bytes, blocking sockets."""
    if role == "server":
        with socket.create_server(("", port)) as srv:
            conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(max(HIDDEN_SIZES) * 4)
        view = memoryview(buf)
        while True:
            head = conn.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return
            nbytes = int.from_bytes(head, "little")
            got = 0
            while got < nbytes:
                got += conn.recv_into(view[got:nbytes])
            conn.sendall(view[:nbytes])
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection((HOSTS[1], port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results = {}
    for n in HIDDEN_SIZES:
        nbytes = n * 4
        msg = memoryview(bytearray(4 + nbytes))
        msg[:4] = nbytes.to_bytes(4, "little")
        back = memoryview(bytearray(nbytes))
        times = []
        for i in range(200 + iters):
            t = time.perf_counter()
            conn.sendall(msg)
            got = 0
            while got < nbytes:
                got += conn.recv_into(back[got:])
            if i >= 200:
                times.append((time.perf_counter() - t) * 1e6)
        results[n] = summary(times)
    conn.close()
    with open(out, "w") as f:
        json.dump({"backend": "tcp ping-pong", "results": results}, f)


def rig_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TP_RUNTIME_COMPILE="off")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def on_host(host: str, argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([RSH, host, " ".join(argv)], env=env)


def launch_hosts(kind: str, per_host: int, iters: int, out: str, port: int) -> dict:
    """`kind`'s ranks, per_host on each of the two hosts (ranks 0.. on tphost0), rank 0 writing `out`."""
    world = per_host * len(HOSTS)
    procs = []
    for r in range(world):
        env = dict(rig_env(), RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % per_host),
                   LOCAL_WORLD_SIZE=str(per_host), MASTER_ADDR=HOSTS[0], MASTER_PORT=str(port))
        procs.append(on_host(HOSTS[r // per_host], [sys.executable, __file__, "--worker", kind, str(iters), out], env))
    if any(p.wait() for p in procs):
        raise SystemExit(f"{kind} at {len(HOSTS)} x {per_host} failed")
    with open(out) as f:
        return json.load(f)["results"]


def run_hosts(iters: int) -> dict:
    """Every column of the multi-host table: {name: {floats: {median_us, p90_us}}}."""
    tmp = f"/tmp/bench_allreduce_hosts_{os.getpid()}.json"
    res = {}
    port = 29600
    server = on_host(HOSTS[1], [sys.executable, __file__, "--ping-pong", "server", str(port), str(iters), tmp], rig_env())
    client = on_host(HOSTS[0], [sys.executable, __file__, "--ping-pong", "client", str(port), str(iters), tmp], rig_env())
    if client.wait() or server.wait():
        raise SystemExit("the TCP ping-pong failed")
    with open(tmp) as f:
        res["tcp round trip (floor)"] = json.load(f)["results"]
    for kind, per_host in (("hier", 2), ("hier", 1), ("hier_gloo", 2), ("gloo", 2), ("gloo", 1)):
        port += 1
        res[f"{kind} {len(HOSTS)}x{per_host}"] = launch_hosts(kind, per_host, iters, tmp, port)
    os.unlink(tmp)
    return res


def hosts_main(args) -> int:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ours = not all(h in listed for h in HOSTS)
    if ours:
        subprocess.run(["bash", RIG, "up", str(len(HOSTS))], check=True, capture_output=True)
    try:
        res = run_hosts(args.iters)
    finally:
        if ours:
            subprocess.run(["bash", RIG, "down"], capture_output=True)
    floor = res["tcp round trip (floor)"]
    names = list(res)
    print(f"All-reduce of fp32 vectors across 2 hosts (network namespaces of one machine), 1 thread a rank, "
          f"median (p90) in microseconds\n")
    print("| floats | " + " | ".join(names) + " | hier 2x2 / floor | hier 2x1 / floor |")
    print("|---" * (len(names) + 3) + "|")
    for n in HIDDEN_SIZES:
        cells = [f"{res[k][str(n)]['median_us']:.1f} ({res[k][str(n)]['p90_us']:.1f})" for k in names]
        f = floor[str(n)]["median_us"]
        ratios = [f"{res[k][str(n)]['median_us'] / f:.2f}x" for k in ("hier 2x2", "hier 2x1")]
        print(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if args.out:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        with open(args.out, "w") as f:
            json.dump({"commit": commit, "date": time.strftime("%Y-%m-%d"), "iters": args.iters, "results": res},
                      f, indent=1)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--hosts", action="store_true", help="across two network-namespace hosts (root)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.hosts:
        return hosts_main(args)
    tmp = f"/tmp/bench_allreduce_{os.getpid()}.json"
    res = {kind: launch(kind, args.world, args.iters, tmp)["results"] for kind in ("shm", "gloo")}
    os.unlink(tmp)
    print(f"All-reduce of fp32 vectors between {args.world} local processes (1 thread each), microseconds\n")
    print("| floats | shm median | shm p90 | gloo median | gloo p90 | gloo / shm (median) |")
    print("|---|---|---|---|---|---|")
    for n in SIZES:
        a, b = res["shm"][str(n)], res["gloo"][str(n)]
        print(f"| {n} | {a['median_us']:.1f} | {a['p90_us']:.1f} | {b['median_us']:.1f} | {b['p90_us']:.1f} | "
              f"{b['median_us'] / a['median_us']:.1f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--ping-pong":
        ping_pong(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    sys.exit(main())
