"""The Ray launcher: a tp=2 engine on a local 2-CPU Ray cluster (one per session, conftest.ray_local) gives
exactly what the same engine gives under the real mpirun, through RayEngine and through `tp-run --launcher ray`;
a cluster too small, a busy cluster and a dead rank are clear errors, never hangs."""

import json
import os
import subprocess
import time

import pytest

from helpers import build_checkpoint, free_port, random_prompts, tool, tp_run_json
from tp_runtime import SamplingParams
from tp_runtime.errors import CommError
from tp_runtime.errors import UserError

pytestmark = pytest.mark.slow  # a local Ray cluster and its actors

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    build_checkpoint(str(root / "hf"), seed=11)
    out = str(root / "tp2")
    subprocess.run([tool("tp-convert"), "--model_dir", str(root / "hf"), "--output_dir", out, "--tp_size", "2"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(103, seed=5)  # 4 rows of different lengths and tokens


@pytest.fixture(scope="module")
def mpirun_outputs(engine, prompts):
    return tp_run_json(engine, 2, ["--input_ids", *(",".join(map(str, p)) for p in prompts),
                                   "--max_output_len", str(NEW_TOKENS), "--ignore_eos"], launcher="mpirun")["outputs"]


def assert_same(outputs, expected, rows):
    for row, o, e in zip(rows, outputs, expected, strict=True):
        assert o.input_ids == e["input_ids"], f"row {row}"
        assert o.output_ids == e["output_ids"], f"row {row}"
        diff = max(abs(a - b) for a, b in zip(o.output_logprobs, e["output_logprobs"], strict=True))
        assert diff < 1e-6, f"row {row}: log-probs differ by {diff}"


def test_ray_engine_matches_mpirun(ray_local, engine, prompts, mpirun_outputs):
    import ray

    from tp_runtime import RayEngine

    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with RayEngine(engine) as eng:
        assert eng.group.cpus_per_rank == 1 and not eng.group.use_gpu  # 2 CPUs shared by 2 ranks
        assert_same(eng.generate(prompts, greedy), mpirun_outputs, range(4))
        # The actors keep their weights: a second call, other rows in another order, the same answers.
        assert_same(eng.generate(prompts[:0:-1], greedy), mpirun_outputs[:0:-1], [3, 2, 1])
        # A request every rank refuses is a UserError, and the engine stays usable.
        with pytest.raises(UserError, match="beyond max_seq_len"):
            eng.generate([prompts[0]], SamplingParams(max_tokens=10_000, ignore_eos=True))
        assert_same(eng.generate(prompts[:1], greedy), mpirun_outputs[:1], [0])
        # The cluster's CPUs are all held: a second engine is refused after its placement timeout (2 s), not
        # left waiting for CPUs that never come (the bound is 30x the timeout: a loaded machine stays green).
        t0 = time.monotonic()
        with pytest.raises(UserError, match="did not grant 2 x"):
            RayEngine(engine, placement_timeout_s=2)
        assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 30  # shutdown() gives the 2 CPUs back
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_cluster_too_small_is_refused_at_once(ray_local, engine):
    from tp_runtime import RayEngine
    from tp_runtime.distributed.ray_cluster import DEFAULT_PLACEMENT_TIMEOUT_S, launch_ranks

    # refused from the cluster's resources at once, before any placement wait (that would take the default
    # placement timeout, DEFAULT_PLACEMENT_TIMEOUT_S, for each of the four)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"tp_size=3 needs 3 x \(1 CPU\) on one node.*largest node .* 2 CPU"):
        launch_ranks(3, len, [])
    with pytest.raises(UserError, match=r"tp_size=3 needs 3 x \(1 CPU\).*2 CPU in all"):
        launch_ranks(3, len, [], placement="spread")
    with pytest.raises(UserError, match=r"tp_size=2 needs 2 x \(2 CPU\) on one node"):
        RayEngine(engine, threads=2)
    with pytest.raises(UserError, match="GPU"):
        RayEngine(engine, device="cuda")
    assert time.monotonic() - t0 < DEFAULT_PLACEMENT_TIMEOUT_S
    assert launch_ranks(2, len, ["a", "b"]) == [2, 2]  # and the cluster still runs ranks


def test_dead_rank_is_reported(ray_local, engine, prompts):
    import ray

    from tp_runtime import RayEngine

    # SPREAD on one node: both bundles there. The communicator's timeout is long (120 s) so that the report
    # below can only come from the actor's death being noticed, well before it (bound 60 s).
    eng = RayEngine(engine, placement="spread", comm_timeout_s=120)
    try:
        ray.kill(eng.group.actors[1])
        t0 = time.monotonic()
        with pytest.raises(CommError, match=r"rank 1 on node \S+ \([\d.]+\) died during generate"):
            eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        assert time.monotonic() - t0 < 60
        with pytest.raises(UserError, match="shut down"):
            eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    finally:
        eng.shutdown()


def test_tp_run_launcher_ray(ray_local, engine, prompts, mpirun_outputs, tmp_path):
    """One command: the driver joins the session's cluster, the actors run tp-run's main, rank 0 prints."""
    out = str(tmp_path / "out.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([tool("tp-run"), "--launcher", "ray", "--ray_address", ray_local, "--engine", engine,
                          "--input_ids", *(",".join(map(str, p)) for p in prompts), "--max_output_len",
                          str(NEW_TOKENS), "--ignore_eos", "--output_json", out],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out) as f:
        got = json.load(f)["outputs"]
    assert [o["output_ids"] for o in got] == [e["output_ids"] for e in mpirun_outputs]
    assert [o["input_ids"] for o in got] == [e["input_ids"] for e in mpirun_outputs]
    # rank 0's lines reach the driver's stdout as they are (no Ray log prefix), once each
    lines = res.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("Output")] == [f"Output [Text {i} Beam 0]" for i in range(4)]
    assert "tp_size=2 device=cpu comm=shm" in res.stderr and "threads/rank=1" in res.stderr

    # a mistake: one line, exit status 2
    bad = subprocess.run([tool("tp-run"), "--launcher", "ray", "--ray_address", ray_local, "--engine", engine,
                          "--input_ids", "1,2", "--threads", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert "error: tp_size=2 needs 2 x (2 CPU) on one node" in bad.stderr and "Traceback" not in bad.stderr
    # no cluster at the address: one line at once (ray.init alone would retry for minutes)
    gone = subprocess.run([tool("tp-run"), "--launcher", "ray", "--ray_address", f"127.0.0.1:{free_port()}",
                           "--engine", engine, "--input_ids", "1,2"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert gone.returncode == 2 and "error: no Ray cluster answers at 127.0.0.1:" in gone.stderr, gone.stderr


def test_tp_serve_launcher_ray(ray_local, smollm2_hf, tmp_path):
    """tp-serve --launcher ray: the ranks are Ray actors, rank 0's actor serves HTTP; a greedy completion equals
    tp-run's text for the same engine and prompt; SIGTERM to the driver ends the actors (the CPUs come back)."""
    import ray
    from openai import OpenAI

    from test_serve import _wait_healthy
    from tp_runtime.convert.pipeline import convert

    engine = str(tmp_path / "smollm2_tp2")
    convert(smollm2_hf, engine, 2, progress=False)
    prompt = "The three primary colors are"
    expected = tp_run_json(engine, 2, ["--input_text", prompt, "--no_prompt_template", "--max_output_len", "12",
                                       "--ignore_eos"])["outputs"][0]["text"]
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([tool("tp-serve"), "--launcher", "ray", "--ray_address", ray_local, "--engine", engine,
                             "--port", str(port), "--max_seq_len", "256"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    deadline = time.monotonic() + 60  # the driver is gone: Ray ends its actors and frees their CPUs
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
