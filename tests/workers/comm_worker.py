"""One rank of the communicator tests: known, different tensors per rank; checks every result."""

import hashlib
import json
import os
import sys

import torch

from tp_runtime.distributed.communicator import make_communicator
from tp_runtime.distributed.launch import detect_launch

mode = sys.argv[1]
if mode == "weak_order":  # pretend to be an ARM server: the shared-memory protocol relies on x86's store order
    import platform

    platform.machine = lambda: "aarch64"
info = detect_launch()
kind = sys.argv[2] if len(sys.argv) > 2 else "shm"
if len(sys.argv) > 3:  # "hosts=H": pretend the ranks run on H hosts, in blocks of consecutive ranks
    from tp_runtime.distributed.hier_comm import HierarchicalCommunicator

    hosts = int(sys.argv[3].removeprefix("hosts="))
    per_host = -(-info.world_size // hosts)
    comm = HierarchicalCommunicator(info, timeout_s=20, required=kind == "hier", host=f"fakehost{info.rank // per_host}",
                                    leader_link=sys.argv[4] if len(sys.argv) > 4 else "tcp")
else:
    comm = make_communicator(info, torch.device("cpu"), timeout_s=20, kind=kind)
r, W = comm.rank, comm.world_size


def back_to_back(steps: int, objects: bool = False) -> None:
    """Many back-to-back calls, alternating kinds, each with a value known in advance."""
    for step in range(steps):
        x = torch.full((576,), float(step * (r + 1)))
        assert comm.all_reduce(x)[0].item() == step * W * (W + 1) / 2
        if step % 3 == 0:
            g = comm.all_gather(torch.full((2, 5), float(r * 1000 + step)), dim=-1)
            assert g.shape == (2, 5 * W) and all(g[0, 5 * q].item() == q * 1000 + step for q in range(W))
        if step % 5 == 0:
            p = torch.full((9,), float(step)) if r == 0 else torch.zeros(9)
            assert comm.broadcast(p, src=0)[8].item() == step
        if objects and step % 50 == 0:
            assert comm.broadcast_object({"step": step} if r == 0 else None)["step"] == step
            assert comm.all_gather_object(r * step) == [q * step for q in range(W)]
            comm.barrier()

path = getattr(comm, "path", None)  # this job's segment: checked by name, other jobs' segments untouched
report = {"backend": comm.backend, "shm_path": path, "shm_left": bool(path) and os.path.exists(path)}
if mode.startswith("die") and r == 0:
    print("REPORT " + json.dumps(report), flush=True)  # before the death: the test checks the name afterwards

if mode == "sums":
    checked = 0
    # several sizes (odd ones, one element, bigger than a 4 MiB slot so it is chunked) and dtypes
    for n in (1, 7, 576, 2048, 8192, 49152, 1_500_001):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if dtype != torch.float32 and n > 100_000:
                continue
            base = torch.arange(n, dtype=torch.float64) % 97
            mine = (base * (r + 1) + r).to(dtype)
            expected = sum((base * (q + 1) + q).to(dtype).double() for q in range(W))
            got = comm.all_reduce(mine.clone()).double()
            tol = 0 if dtype == torch.float32 else 0.02 * expected.abs().max().item()
            assert (got - expected).abs().max().item() <= tol, (n, dtype)
            checked += 1
    back_to_back(3000)
    checked += 3000
    report["checked"] = checked
elif mode == "hier_sums":
    # random data, different on every rank; the expected sum is computed here in the communicator's order
    # (ranks in rank order within a host, in fp32; hosts in host order), so the result is checked to the bit
    host_of = comm.hosts
    checked = 0
    for step, n in enumerate((1, 7, 576, 2048, 6144, 49152, 1_500_001) * 2):
        for dtype in (torch.float32, torch.bfloat16):
            if dtype != torch.float32 and n > 100_000:
                continue
            xs = [torch.randn(n, generator=torch.Generator().manual_seed(1000 * step + q)).to(dtype) for q in range(W)]
            partials = []
            for h in dict.fromkeys(host_of):
                ranks = [q for q in range(W) if host_of[q] == h]
                part = xs[ranks[0]].float()
                for q in ranks[1:]:
                    part = part + xs[q].float()
                partials.append(part)
            expected = partials[0]
            for p in partials[1:]:
                expected = expected + p
            got = comm.all_reduce(xs[r].clone())
            assert torch.equal(got, expected.to(dtype)), (n, dtype, (got.float() - expected).abs().max().item())
            digests = comm.all_gather_object(hashlib.sha1(got.view(torch.uint8).numpy().tobytes()).hexdigest())
            assert len(set(digests)) == 1, (n, dtype)
            checked += 1
    back_to_back(500, objects=True)
    report["checked"] = checked + 500
elif mode.startswith("die"):
    victim = W - 1 if mode == "die" else int(mode.removeprefix("die_rank"))
    for step in range(10**9):
        comm.all_reduce(torch.ones(576))
        if r == victim and step == 200:
            os._exit(9)  # the last rank dies in the middle of the run

if r == 0 and not mode.startswith("die"):
    print("REPORT " + json.dumps(report), flush=True)
comm.close()
