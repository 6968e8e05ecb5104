"""Bad input: one clear line naming what is wrong and what would be right, exit != 0, no traceback,
nothing lost."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import build_checkpoint, free_port, run_ranks, tool
from tp_runtime.convert.pipeline import convert


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    build_checkpoint(str(root / "hf"), "llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    convert(str(root / "hf"), str(root / "tp1"), 1, progress=False)
    convert(str(root / "hf"), str(root / "tp2"), 2, progress=False)
    return root


def run(args, n=1, launcher="env"):
    res = run_ranks(n, args, launcher, timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def expect_error(res, *needles, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def test_impossible_tp_size_lists_valid_sizes(ckpt, tmp_path):
    res = run([tool("tp-convert"), "--model_dir", str(ckpt / "hf"), "--output_dir", str(tmp_path / "e"),
               "--tp_size", "4"])
    expect_error(res, "tp_size=4", "valid tp sizes: 1, 2, 3, 6")
    assert not os.path.exists(tmp_path / "e")


def test_existing_output_dir_is_refused_and_kept(ckpt, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run([tool("tp-convert"), "--model_dir", str(ckpt / "hf"), "--output_dir", str(out)])
    expect_error(res, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_conversion_leaves_no_engine_and_keeps_the_old_one(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt / "hf", broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    old = tmp_path / "old_engine"
    shutil.copytree(ckpt / "tp1", old)
    res = run([tool("tp-convert"), "--model_dir", str(broken), "--output_dir", str(old), "--force"])
    expect_error(res, "model.layers.1.mlp.down_proj.weight")
    assert sorted(os.listdir(old)) == sorted(os.listdir(ckpt / "tp1"))  # the old engine is untouched
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]  # no half-written directory left


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    res = run([tool("tp-convert"), "--model_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "e")])
    expect_error(res, "unsupported architecture 'GPT2LMHeadModel'", "LlamaForCausalLM", "MistralForCausalLM")


def test_corrupt_model_config(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    res = run([tool("tp-convert"), "--model_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "e")])
    expect_error(res, "config.json is not valid JSON")


def test_bin_checkpoint_loads_with_weights_only(ckpt, tmp_path):
    from safetensors.torch import load_file

    hf = tmp_path / "bin"
    hf.mkdir()
    shutil.copy(ckpt / "hf" / "config.json", hf / "config.json")
    torch.save(load_file(str(ckpt / "hf" / "model.safetensors")), hf / "pytorch_model.bin")
    convert(str(hf), str(tmp_path / "e"), 1, progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e" / "rank0.safetensors"), "pt") as a, \
         safe_open(str(ckpt / "tp1" / "rank0.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


class Payload:  # a pickled object that is not a tensor: weights_only refuses it
    pass


def test_bin_with_objects_is_refused_with_a_way_out(ckpt, tmp_path):
    hf = tmp_path / "bin"
    hf.mkdir()
    shutil.copy(ckpt / "hf" / "config.json", hf / "config.json")
    torch.save({"x": Payload()}, hf / "pytorch_model.bin")
    res = run([tool("tp-convert"), "--model_dir", str(hf), "--output_dir", str(tmp_path / "e")])
    expect_error(res, "weights_only=True", "safetensors")


def test_world_size_differs_from_tp_size_on_every_rank(ckpt):
    res = run([tool("tp-run"), "--engine", str(ckpt / "tp2"), "--input_ids", "1,2,3"])
    expect_error(res, "converted for tp_size=2", "1 rank(s)")
    res = run([tool("tp-run"), "--engine", str(ckpt / "tp1"), "--input_ids", "1,2,3"], n=2, launcher="mpirun")
    assert res.returncode != 0
    assert res.stderr.count("converted for tp_size=1, but 2 rank(s)") == 2  # each rank says it, before any collective


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_rank_file(ckpt, tmp_path, damage):
    engine = tmp_path / "e"
    shutil.copytree(ckpt / "tp2", engine)
    f = engine / "rank1.safetensors"
    if damage == "missing":
        f.unlink()
    else:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    res = run([tool("tp-run"), "--engine", str(engine), "--input_ids", "1,2,3"], n=2)
    assert res.returncode == 2
    assert res.stderr.count(f"rank1.safetensors is {damage}") == 2, res.stderr  # both ranks, no hang


@pytest.mark.parametrize("content,needle", [(None, "config.json is missing"), ("[1, 2", "not valid JSON"),
                                            ('{"format_version": 99}', "format_version 99")])
def test_missing_or_corrupt_engine_config(ckpt, tmp_path, content, needle):
    engine = tmp_path / "e"
    shutil.copytree(ckpt / "tp1", engine)
    if content is None:
        (engine / "config.json").unlink()
    else:
        (engine / "config.json").write_text(content)
    expect_error(run([tool("tp-run"), "--engine", str(engine), "--input_ids", "1,2,3"]), needle)


@pytest.mark.slow
def test_prompt_longer_than_max_input_length(ckpt):
    res = run([tool("tp-run"), "--engine", str(ckpt / "tp2"), "--input_ids", "1,2,3,4,5,6", "--max_input_length", "4"],
              n=2)
    assert res.returncode == 2
    assert res.stderr.count("prompt 0 has 6 tokens, more than --max_input_length 4") == 2


def test_prompt_beyond_max_seq_len(ckpt):
    res = run([tool("tp-run"), "--engine", str(ckpt / "tp1"), "--input_ids", "1,2,3,4,5,6", "--max_seq_len", "8",
               "--max_output_len", "4"])
    expect_error(res, "beyond max_seq_len 8")


@pytest.mark.parametrize("flags,needle", [
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top_k", "-2"], "top_k must be >= 0"),
    (["--repetition_penalty", "0"], "repetition_penalty must be > 0"),
    (["--max_output_len", "0"], "max_tokens / --max_output_len must be a positive integer"),
])
def test_bad_sampling_values(ckpt, flags, needle):
    expect_error(run([tool("tp-run"), "--engine", str(ckpt / "tp1"), "--input_ids", "1,2,3", *flags]), needle)


@pytest.mark.parametrize("comm", ["gloo", "shm"])
@pytest.mark.slow
def test_a_dead_rank_ends_the_job(ckpt, comm):
    """Kill rank 1 in the middle of a long generation: rank 0 must stop within 60 s, in one line that names rank 1
    and its host."""
    port = str(free_port())
    args = [tool("tp-run"), "--engine", str(ckpt / "tp2"), "--input_ids", "1,2,3", "--max_output_len", "4000",
            "--max_seq_len", "4096", "--ignore_eos", "--comm", comm]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        line = procs[0].stderr.readline()  # rank 0 reports its load: generation starts right after
        assert "loaded in" in line, line + procs[0].stderr.read()
        time.sleep(1.0)
        assert procs[0].poll() is None, "generation ended before the kill; make it longer"
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=300)
        # the job ends within the collective timeout (45 s) plus start-up slack, not at the test's limit
        assert time.monotonic() - t0 < 120, err
        assert procs[0].returncode == 3
        host = socket.gethostname()
        assert f"error: rank 0: rank 1 on host {host} (" in err and "is lost: its process is gone" in err, err
        assert "Traceback" not in err and len([x for x in err.splitlines() if "error" in x.lower()]) == 1, err
    finally:
        for p in procs:
            p.kill()


class _FakeDist:
    """torch.distributed as a communicator sees it, failing the way it is told to."""

    def __init__(self, exc):
        self.exc = exc

    def all_reduce(self, tensor):
        raise self.exc


def _fake_comm(exc):
    from tp_runtime.distributed.comm import TorchDistCommunicator

    comm = object.__new__(TorchDistCommunicator)  # no process group: only the guard is under test
    comm.rank, comm.world_size, comm.timeout_s, comm.dist = 1, 2, 45, _FakeDist(exc)
    return comm


@pytest.mark.parametrize("exc", [
    RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:13005"),
    RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 45000ms for recv operation"),
    ConnectionResetError(104, "Connection reset by peer"),
    torch.distributed.DistBackendError("NCCL communicator was aborted"),
])
def test_a_failed_collective_is_a_comm_error(exc):
    from tp_runtime.errors import CommError

    with pytest.raises(CommError, match=r"rank 1: all_reduce failed, another rank died or timed out after 45s"):
        _fake_comm(exc)._all_reduce(torch.ones(2))


@pytest.mark.parametrize("exc", [TypeError("all_reduce() got an unexpected keyword argument"),
                                 RuntimeError("The size of tensor a (4) must match the size of tensor b (3)"),
                                 AttributeError("'NoneType' object has no attribute 'shape'")])
def test_a_bug_in_a_collective_keeps_its_type_and_traceback(exc):
    with pytest.raises(type(exc)) as info:
        _fake_comm(exc)._all_reduce(torch.ones(2))
    assert info.value is exc and info.traceback  # the same exception, raised where it happened
