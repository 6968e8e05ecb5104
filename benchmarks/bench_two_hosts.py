"""Decode speed of one engine at tp=2 on one host against two hosts (network namespaces of this machine, the
multi-host test rig: launch/netns_hosts.sh), SmolLM2-135M-Instruct fp32, one thread per rank (--threads 1: the
two "hosts" share this machine's cores, and a rank alone on its host would take them all), eager decode.

    one host    torchrun --nproc_per_node 2 in tphost0: shared-memory all-reduce
    two hosts   torchrun --nnodes 2, one rank in tphost0 and one in tphost1: gloo over the veth pair

Each run decodes --tokens tokens for a batch of --batch prompts (ignore_eos) and reports tp-run's decode tokens/s
and TTFT; the greedy ids must be equal in both. Needs root and iproute2.

    .venv/bin/python benchmarks/bench_two_hosts.py [--tokens 64 --batch 1 4]
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from netns_hosts import Hosts, unavailable, wait_all  # noqa: E402

PROMPTS = ["Name three rivers of Europe.", "What does a compiler do?", "Write a haiku about rain.",
           "Why is the sky blue?"]


def run(h: Hosts, engine: str, nodes: int, batch: int, tokens: int, out: str, port: int, comm: str = "auto") -> dict:
    bindir = os.path.dirname(sys.executable)
    args = [os.path.join(bindir, "tp-run"), "--engine", engine, "--input_text", *PROMPTS[:batch], "--max_output_len",
            str(tokens), "--ignore_eos", "--compile", "off", "--output_json", out, "--comm", comm, "--threads", "1"]
    per_node = 2 // nodes
    procs = [h.popen(host, [os.path.join(bindir, "torchrun"), "--nnodes", str(nodes), "--node_rank", str(k),
                            "--nproc_per_node", str(per_node), "--rdzv_endpoint", f"{h.names[0]}:{port}", *args],
                     h.env())
             for k, host in enumerate(h.names[:nodes])]
    for k, (rc, stdout, stderr) in enumerate(wait_all(procs, timeout=900)):
        if rc != 0:
            raise RuntimeError(f"{h.names[k]} failed:\n{stderr[-3000:]}")
    with open(out) as f:
        data = json.load(f)
    return {"ids": [o["output_ids"] for o in data["outputs"]], **data["timings"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--engine_root", default=None)
    p.add_argument("--comm", default="auto", help="the two-host runs' --comm (auto: gloo at one rank a host)")
    args = p.parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench_two_hosts: {why}", file=sys.stderr)
        return 1
    from tp_runtime.assets import smollm2_hf_dir
    from tp_runtime.convert.pipeline import convert

    root = args.engine_root or tempfile.mkdtemp(prefix="bench_hosts_")
    engine = os.path.join(root, "smollm2_tp2")
    if not os.path.isfile(os.path.join(engine, "config.json")):
        convert(smollm2_hf_dir(), engine, 2, progress=False)
    h = Hosts(2)
    h.up()
    rows = []
    try:
        port = 29610
        for batch in args.batch:
            res = {}
            for nodes in (1, 2):
                port += 1
                res[nodes] = run(h, engine, nodes, batch, args.tokens, os.path.join(root, f"out{nodes}.json"), port,
                                 "auto" if nodes == 1 else args.comm)
            rows.append((batch, res))
    finally:
        h.down()
    print("| batch | one host: decode tok/s (per sequence), TTFT | two hosts | two / one | same ids |")
    print("|---|---|---|---|---|")
    for batch, res in rows:
        one, two = res[1], res[2]
        print(f"| {batch} | {one['decode_tokens_per_s']:.1f}, {one['ttft_ms']:.0f} ms | "
              f"{two['decode_tokens_per_s']:.1f}, {two['ttft_ms']:.0f} ms | "
              f"{two['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f} | {one['ids'] == two['ids']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
