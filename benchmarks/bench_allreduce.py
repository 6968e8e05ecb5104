"""All-reduce latency between local CPU ranks: the shared-memory communicator against gloo.

Two processes (or --world), 1 thread each, fp32, sizes 576 / 2048 / 8192 / 49152 / 1M floats; for each
backend and size, 200 warm-up calls then --iters timed calls; median and p90 in microseconds.

    .venv/bin/python benchmarks/bench_allreduce.py [--world 2] [--iters 2000] [--out FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = (576, 2048, 8192, 49152, 1 << 20)


def worker(kind: str, iters: int, out: str) -> None:
    import torch

    from tp_runtime.distributed.communicator import make_communicator
    from tp_runtime.distributed.launch import detect_launch

    torch.set_num_threads(1)
    comm = make_communicator(detect_launch(), torch.device("cpu"), 60, kind)
    results = {}
    for n in SIZES:
        x = torch.ones(n)
        reps = iters if n < 100_000 else max(50, iters // 20)
        for _ in range(200 if n < 100_000 else 10):
            comm.all_reduce(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            comm.all_reduce(x)
            times.append((time.perf_counter() - t) * 1e6)
        times.sort()
        results[n] = {"median_us": statistics.median(times), "p90_us": times[int(0.9 * len(times))]}
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"backend": comm.backend, "results": results}, f)
    comm.close()


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
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
    sys.exit(main())
