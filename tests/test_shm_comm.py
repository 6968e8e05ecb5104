"""The shared-memory communicator: known sums, chosen per the rules, no /dev/shm leftovers, a dead
rank detected, and engines that give the same tokens over shm as over gloo."""

import json
import os
import sys

import pytest

from helpers import build_checkpoint, run_ranks, tp_run_json
from tp_runtime.convert.pipeline import convert

WORKER = os.path.join(os.path.dirname(__file__), "workers", "comm_worker.py")


def report(res, ok=True):
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_known_sums_gathers_and_broadcasts(world):
    rep = report(run_ranks(world, [sys.executable, WORKER, "sums"], timeout=300))
    assert rep["backend"] == "shm" and rep["checked"] > 3000
    # the segment is unlinked once every rank has mapped it, so nothing is left after the job
    assert rep["shm_path"].startswith("/dev/shm/tp_runtime_") and not rep["shm_left"]
    assert not os.path.exists(rep["shm_path"])


@pytest.mark.slow
def test_auto_picks_shm_on_one_host_and_gloo_when_asked():
    assert report(run_ranks(2, [sys.executable, WORKER, "none", "auto"]))["backend"] == "shm"
    assert report(run_ranks(2, [sys.executable, WORKER, "none", "gloo"]))["backend"] == "gloo"


@pytest.mark.slow
def test_weakly_ordered_cpus_are_refused_loudly():
    """On a CPU without x86's store order the protocol could read a flag before its data: auto falls back
    to gloo with a warning, --comm shm is a clear error."""
    res = run_ranks(2, [sys.executable, WORKER, "weak_order", "auto"])
    assert report(res)["backend"] == "gloo"
    assert "relies on x86's store order, which aarch64 CPUs do not guarantee" in res.stderr
    res = run_ranks(2, [sys.executable, WORKER, "weak_order", "shm"])
    assert res.returncode != 0 and "--comm shm: the shared-memory communicator relies on x86" in res.stderr


@pytest.mark.slow
def test_a_rank_dying_mid_collective_fails_the_others_fast():
    """The survivor notices the dead peer (its pid is gone) long before the collective timeout (20 s)."""
    res = run_ranks(2, [sys.executable, WORKER, "die"], timeout=120)
    assert res.returncode != 0
    assert "rank 0: rank 1 on host " in res.stderr, res.stderr[-2000:]
    assert "is lost: its process is gone (during all_reduce)" in res.stderr, res.stderr[-2000:]
    assert "within 20s" not in res.stderr  # found dead, not timed out
    assert not os.path.exists(report(res, ok=False)["shm_path"])


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 3])
def test_engine_over_shm_equals_gloo(tp, tmp_path):
    """tp=2: bit for bit (a + b is the same sum in any order). tp=3: gloo may add in another order,
    so log-probs agree within fp32 summation tolerance (1e-5) and greedy ids are equal."""
    build_checkpoint(str(tmp_path / "hf"), "llama", seed=21, num_attention_heads=6, num_key_value_heads=3,
                     hidden_size=96, intermediate_size=100)
    convert(str(tmp_path / "hf"), str(tmp_path / "e"), tp, progress=False)
    prompts = ["5,9,11,40,2,7", "3,3,80,12", "60,61,62,63,64,65,66,67,68"]
    common = ["--input_ids", *prompts, "--max_output_len", "12", "--ignore_eos"]
    shm = tp_run_json(str(tmp_path / "e"), tp, common + ["--comm", "shm"])
    gloo = tp_run_json(str(tmp_path / "e"), tp, common + ["--comm", "gloo"])
    for a, b in zip(shm["outputs"], gloo["outputs"], strict=True):
        assert a["output_ids"] == b["output_ids"]
        if tp == 2:
            assert a["output_logprobs"] == b["output_logprobs"]
        else:
            assert max(abs(x - y) for x, y in zip(a["output_logprobs"], b["output_logprobs"], strict=True)) < 1e-5
