"""The compiled decode step (--compile on) against transformers, at tp 1 and 2.

The other tests run the eager step (conftest sets TP_RUNTIME_COMPILE=off, compiling costs tens of
seconds per process on 2 cores); here torch.compile builds the decode graph for batch 1 (at load)
and for a larger batch (on first use), with the all-reduces and the logits gather as custom ops
inside it at tp=2, and every row must still give transformers' greedy ids and log-probs.
"""


import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import build_checkpoint, random_prompts, reference_greedy, reference_logprobs, run_ranks, tool
from tp_runtime.convert.pipeline import convert
from tp_runtime.errors import UserError
from tp_runtime.runtime.llm import pick_compile

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    # a sliding window shorter than the prompts, GQA, KV heads replicated at tp=2
    model = build_checkpoint(str(root / "hf"), "mistral", seed=5, num_attention_heads=4, num_key_value_heads=1,
                             hidden_size=64, sliding_window=5, num_hidden_layers=2, vocab_size=97)
    return model, root


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_compiled_decode_matches_transformers(mistral, tp):
    model, root = mistral
    engine = str(root / f"tp{tp}")
    convert(str(root / "hf"), engine, tp, progress=False)
    prompts = random_prompts(97, seed=tp)
    # 4 prompts, 3 batch slots: the first three decode together (the batch >= 2 graph), the fourth joins when
    # their slots free and decodes alone (the batch-1 graph); one process, one compile
    out_file = str(root / f"out{tp}.json")
    res = run_ranks(tp, [tool("tp-run"), "--engine", engine, "--input_ids", *(",".join(map(str, p)) for p in prompts),
                         "--max_output_len", str(NEW_TOKENS), "--ignore_eos", "--compile", "on",
                         "--max_batch_size", "3", "--output_json", out_file])
    assert res.returncode == 0, res.stderr
    assert "decode step compiled in" in res.stderr  # not a silent fallback to the eager step
    with open(out_file) as f:
        out = json.load(f)
    for row, (p, o) in enumerate(zip(prompts, out["outputs"], strict=True)):
        assert o["output_ids"] == reference_greedy(model, p, NEW_TOKENS), f"tp={tp} row {row}"
        ref = reference_logprobs(model, p, o["output_ids"])
        assert max(abs(a - b) for a, b in zip(ref, o["output_logprobs"], strict=True)) < 1e-3


@pytest.fixture(scope="module")
def in_process(mistral):
    model, root = mistral
    engine = str(root / "in_process")
    convert(str(root / "hf"), engine, 1, progress=False)
    return engine


def _batches_and_eager(engine):
    """Batches of 1..4 rows over spans ~5..20, and what the eager step gives for them."""
    from tp_runtime import LLM, SamplingParams

    prompts = random_prompts(97, seed=7)
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    batches = (prompts[:3], prompts[:1], prompts[1:3], prompts[:4])
    llm = LLM(engine, compile="off", max_batch_size=4)
    eager = [llm.generate(batch, params) for batch in batches]
    llm.close()
    return batches, params, eager


def _same(got, want):
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    for g, w in zip(got, want, strict=True):
        assert max(abs(a - b) for a, b in zip(g.output_logprobs, w.output_logprobs, strict=True)) < 1e-4


@pytest.mark.slow
def test_no_recompile_after_load(in_process, monkeypatch):
    """The graphs built at load serve every later batch size and attention span: a recompile mid-generation
    would stall the other ranks' collectives (and cost seconds on its own). Checked on the guarded path
    (TP_RUNTIME_ALL_GUARDS=1: Dynamo checks every guard and would recompile on any mismatch); the compiled
    step gives the eager step's tokens."""
    from torch._dynamo.utils import counters

    from tp_runtime import LLM

    batches, params, eager = _batches_and_eager(in_process)
    monkeypatch.setenv("TP_RUNTIME_ALL_GUARDS", "1")
    counters.clear()
    llm = LLM(in_process, compile="on", max_batch_size=4)
    assert llm.model.compiled_step.path == "guarded"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # batch 1 and batch >= 2, built at load
    for batch, want in zip(batches, eager, strict=True):
        _same(llm.generate(batch, params), want)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"], dict(counters["recompiles"])
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["direct", "stance"])
def test_every_compile_path_gives_the_eager_tokens(in_process, path):
    """Each way of calling the compiled graphs (runtime/compile.py), forced in turn: the fast path (Dynamo's
    bytecode called directly) and its fallbacks, so a torch without the private API still decodes right."""
    from tp_runtime import LLM
    from tp_runtime.runtime.compile import compile_decode, has_stance

    if path == "stance" and not has_stance():
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.set_stance")
    batches, params, eager = _batches_and_eager(in_process)
    llm = LLM(in_process, compile="off", max_batch_size=4)
    step = compile_decode(llm.model, llm.cache, 2, path)
    assert step.path == path
    llm.model.compiled_step = step
    for batch, want in zip(batches, eager, strict=True):
        _same(llm.generate(batch, params), want)
    llm.close()


@pytest.mark.slow
def test_direct_path_falls_back_when_the_bytecode_is_not_there(in_process, monkeypatch):
    """Where this torch does not expose Dynamo's cache entries, auto takes the stance (or guarded) path."""
    import torch._C._dynamo.eval_frame as eval_frame

    from tp_runtime import LLM
    from tp_runtime.runtime.compile import compile_decode

    batches, params, eager = _batches_and_eager(in_process)
    monkeypatch.delattr(eval_frame, "_debug_get_cache_entry_list")
    llm = LLM(in_process, compile="off", max_batch_size=4)
    step = compile_decode(llm.model, llm.cache, 2, "auto")
    assert step.path in ("stance", "guarded") and not step.graphs
    llm.model.compiled_step = step
    for batch, want in zip(batches, eager, strict=True):
        _same(llm.generate(batch, params), want)
    with pytest.raises(UserError, match="does not expose Dynamo's bytecode"):
        compile_decode(llm.model, llm.cache, 2, "direct")
    llm.close()


def test_compile_switch(monkeypatch):
    cpu = torch.device("cpu")
    assert pick_compile("off", cpu) is False
    monkeypatch.setenv("TP_RUNTIME_COMPILE", "off")
    assert pick_compile("auto", cpu) is False
    monkeypatch.setenv("TP_RUNTIME_COMPILE", "sometimes")
    with pytest.raises(UserError, match="TP_RUNTIME_COMPILE must be one of"):
        pick_compile("auto", cpu)
    with pytest.raises(UserError, match="--compile must be one of"):
        pick_compile("yes", cpu)
    monkeypatch.delenv("TP_RUNTIME_COMPILE")
    if any(__import__("shutil").which(c) for c in ("c++", "g++", "clang++")):
        assert pick_compile("auto", cpu) is True
    monkeypatch.setenv("TP_RUNTIME_COMPILE", "sometimes")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        pick_compile("on", cpu)
    monkeypatch.delenv("TP_RUNTIME_COMPILE")
    assert pick_compile("auto", cpu) is False  # no compiler: eager, no error


@pytest.mark.slow
def test_engines_of_different_layouts_compiled_in_one_process(mistral, tmp_path, monkeypatch):
    """Several LLMs in one process (a benchmark taking turns, a notebook): each compiled decode step is its
    own code object, so one model's cache entries and guards never meet another's weights (they did: six
    engines of different layouts in one process raised KeyError 'weight' in Dynamo's guards)."""
    from tp_runtime import LLM, SamplingParams
    from tp_runtime.convert import quantize as qz
    model, root = mistral
    monkeypatch.delenv("TP_RUNTIME_COMPILE", raising=False)
    prompt = random_prompts(97, seed=11)[0]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    llms, eager = [], []
    for name, quant in (("fp32", None), ("int8", qz.parse_scheme("int8")), ("int4", qz.parse_scheme("int4", 32))):
        engine = str(tmp_path / name)
        convert(str(root / "hf"), engine, 1, progress=False, quant=quant)
        ref = LLM(engine, compile="off", woq_kernel={"fp32": "auto", "int8": "dequant_int8", "int4": "dequant_int4"}[name])
        eager.append(ref.generate([prompt], params)[0])
        ref.close()
        llms.append(LLM(engine, compile="on", max_batch_size=1, max_seq_len=64))
    for _ in range(2):
        for llm, ref in zip(llms, eager, strict=True):
            out = llm.generate([prompt], params)[0]
            assert out.output_ids == ref.output_ids
            assert max(abs(a - b) for a, b in zip(out.output_logprobs, ref.output_logprobs, strict=True)) < 1e-3
    for llm in llms:
        llm.close()


@pytest.mark.slow
def test_a_one_shot_run_compiles_only_when_it_pays_back(mistral, tmp_path):
    """tp-run knows its decode steps before it loads: --compile auto skips a compile the run cannot pay back
    (judged by the last compile on this machine, a cold guess where there was none) and says so."""
    from tp_runtime.runtime.compile import FIRST_COMPILE_GUESS_S, STEP_SAVING_S, pays_back

    assert pays_back(None, None) and pays_back(None, 1e6)  # a server or the Python API: long-lived
    assert not pays_back(100, None) and not pays_back(100, 30.0)
    assert pays_back(int(FIRST_COMPILE_GUESS_S / STEP_SAVING_S), None) and pays_back(3000, 30.0)
    _, root = mistral
    engine = str(tmp_path / "e")
    convert(str(root / "hf"), engine, 1, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "TP_RUNTIME_COMPILE"}
    env["TP_RUNTIME_CACHE"] = str(tmp_path / "cache")  # no compile recorded here
    res = subprocess.run([tool("tp-run"), "--engine", engine, "--input_ids", "5,6,7", "--max_output_len", "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "eager decode (4 decode steps would not pay back compiling the step (never compiled here)" in res.stderr


_WRITE_ROWS = """
import sys, torch
from tp_runtime.runtime.compile import key_cache_by_isa
print(key_cache_by_isa())
def write(cache, rows, at, new):  # a decode step's KV-cache write: rows of 16 floats at position `at`
    cache[rows, :, at] = new
    return cache.sum()
cache = torch.randn(3, 2, 8, 16)
want = cache.clone()
new = torch.randn(2, 1, 2, 16)
rows, at = torch.tensor([[0], [2]]), torch.tensor([[3], [5]])
torch.compile(write, dynamic=False)(cache, rows, at, new)
want[rows, :, at] = new
sys.exit(0 if torch.equal(cache, want) else 3)
"""


def test_compiled_code_of_one_isa_is_never_reused_under_another(tmp_path):
    """Inductor's cache keys leave out the vector ISA: tp_runtime keeps one directory per ISA, so a run capped to
    AVX2 and one that is not, sharing a cache, each write exactly their KV-cache rows."""
    from tp_runtime import cpu

    if not {"avx2", "avx512"} <= set(cpu.levels_available()):
        pytest.skip(f"needs a CPU with AVX-512 to run two vector widths; this one: {cpu.describe()}")
    # torch's own caps, which TP_RUNTIME_ISA sets on import, come from the cap of each run alone
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    dirs = []
    for cap in ("avx2", "", "avx2"):  # the second and third each find the other width's code in the cache
        res = subprocess.run([sys.executable, "-c", _WRITE_ROWS], env={**env, "TP_RUNTIME_ISA": cap},
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (cap, res.stdout, res.stderr[-2000:])
        dirs.append(res.stdout.strip())
    assert dirs[0] == dirs[2] != dirs[1] and all(d.startswith(str(tmp_path)) for d in dirs)
