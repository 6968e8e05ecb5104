"""Core / NUMA binding rules on described topologies, and for real on this machine."""

import pytest

from helpers import build_checkpoint, run_ranks, tool
from tp_runtime.distributed.binding import plan_binding
from tp_runtime.convert.pipeline import convert
from tp_runtime.errors import UserError

TWO_NODES = {0: tuple(range(0, 8)), 1: tuple(range(8, 16))}
UNEVEN = {0: (0, 1, 2, 3, 4, 5), 1: (6, 7)}


def test_two_nodes_two_ranks_get_a_node_each():
    b = [plan_binding(tuple(range(16)), TWO_NODES, r, 2) for r in range(2)]
    assert [(x.mode, x.node, x.cores, x.threads) for x in b] == [("numa", 0, tuple(range(8)), 8),
                                                                  ("numa", 1, tuple(range(8, 16)), 8)]


def test_uneven_nodes_keep_their_own_sizes_and_reserve():
    b = [plan_binding(tuple(range(8)), UNEVEN, r, 2, "numa", reserve_cores=1) for r in range(2)]
    assert [(x.cores, x.threads) for x in b] == [((0, 1, 2, 3, 4, 5), 5), ((6, 7), 1)]


def test_more_ranks_than_nodes_falls_back_to_even_core_slices():
    b = [plan_binding(tuple(range(16)), TWO_NODES, r, 3) for r in range(3)]
    assert [x.mode for x in b] == ["cores"] * 3
    assert [x.cores for x in b] == [tuple(range(0, 6)), tuple(range(6, 11)), tuple(range(11, 16))]
    with pytest.raises(UserError, match="a NUMA node per local rank"):
        plan_binding(tuple(range(16)), TWO_NODES, 0, 3, "numa")


def test_only_allowed_cores_are_used():
    b = plan_binding((2, 3, 10, 11), TWO_NODES, 1, 2)
    assert (b.node, b.cores) == (1, (10, 11))
    b = plan_binding((0, 1), {0: (0, 1)}, 0, 1)  # one rank alone: no binding
    assert b.mode == "none" and b.threads == 2
    with pytest.raises(UserError, match="a core per local rank"):
        plan_binding((0, 1), {0: (0, 1)}, 0, 3, "cores")
    oversubscribed = plan_binding((0, 1), {0: (0, 1)}, 2, 3)  # auto: 3 ranks on 2 cores stay unbound
    assert (oversubscribed.mode, oversubscribed.threads) == ("none", 1)


def test_ranks_report_the_cores_they_were_given(tmp_path):
    import json
    import os
    import sys

    build_checkpoint(str(tmp_path / "hf"), "llama", num_attention_heads=4, num_key_value_heads=2)
    convert(str(tmp_path / "hf"), str(tmp_path / "e"), 2, progress=False)
    script = tmp_path / "job.py"
    script.write_text(
        "import json, os, sys\n"
        "from tp_runtime import LLM\n"
        "llm = LLM(sys.argv[1], bind='cores')\n"
        "seen = [llm.rank, sorted(os.sched_getaffinity(0)), list(llm.binding.cores), llm.threads]\n"
        "open(f'{sys.argv[2]}/rank{llm.rank}.json', 'w').write(json.dumps(seen))\n"
        "llm.close()\n")
    res = run_ranks(2, [sys.executable, str(script), str(tmp_path / "e"), str(tmp_path)], "mpirun")
    assert res.returncode == 0, res.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    allowed = sorted(os.sched_getaffinity(0))
    assert [r for r, *_ in seen] == [0, 1]
    for rank, actual, given, threads in seen:
        assert actual == given and threads == len(given)  # the affinity it has is the one it reports
    assert sorted(c for _, _, given, _ in seen for c in given) == allowed  # disjoint slices covering the host
    res = run_ranks(2, [tool("tp-run"), "--engine", str(tmp_path / "e"), "--input_ids", "1,2", "--max_output_len", "2"],
                    "mpirun")
    assert res.returncode == 0 and res.stderr.count("[tp-run] bind local rank") == 2  # rank 0 prints both
