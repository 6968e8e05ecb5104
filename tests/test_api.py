"""The Python API (LLM.generate), alone and in every rank of an mpirun job; and the sampler."""

import json
import sys
import textwrap

import os

import pytest
import torch

from helpers import build_checkpoint, run_ranks
from tp_runtime import LLM, SamplingParams
from tp_runtime.convert.pipeline import convert
from tp_runtime.runtime.sampling import RowSampler, apply_repetition_penalty, filter_top_k_top_p

PROMPTS = [[5, 9, 11, 40], [7, 3, 3, 80, 12, 19, 44, 2, 9], [60]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    build_checkpoint(str(root / "hf"), "llama", seed=3, num_attention_heads=4, num_key_value_heads=2,
                     eos_token_id=6)
    for tp in (1, 2):
        convert(str(root / "hf"), str(root / f"tp{tp}"), tp, progress=False)
    return root


SCRIPT = textwrap.dedent("""
    import json, sys
    from tp_runtime import LLM, SamplingParams
    llm = LLM(sys.argv[1])
    outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=10, ignore_eos=True))
    sampled = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9,
                                                                    top_k=20, seed=5, ignore_eos=True))
    if llm.rank == 0:
        json.dump({"greedy": [o.output_ids for o in outs], "sampled": [o.output_ids for o in sampled],
                   "same_on_all_ranks": True}, open(sys.argv[3], "w"))
    else:
        assert [o.output_ids for o in outs], "every rank gets the results"
    llm.close()
""")


def test_api_under_mpirun_equals_api_alone(engines, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    res = run_ranks(2, [sys.executable, str(script), str(engines / "tp2"), json.dumps(PROMPTS), str(out)], "mpirun")
    assert res.returncode == 0, res.stderr
    under_mpi = json.loads(out.read_text())

    llm = LLM(str(engines / "tp1"))
    alone = llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.output_ids for o in alone] == under_mpi["greedy"]
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=5,
                                                   ignore_eos=True))
    assert [o.output_ids for o in sampled] == under_mpi["sampled"]
    assert [o.output_ids for o in sampled] != [o.output_ids for o in alone]


def test_rows_equal_their_prompt_alone_and_seeds_repeat(engines):
    llm = LLM(str(engines / "tp1"), max_batch_size=2)  # 3 prompts: two batches
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    batch = llm.generate(PROMPTS, params)
    for p, o in zip(PROMPTS, batch, strict=True):
        assert llm.generate([p], params)[0].output_ids == o.output_ids
    other = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, seed=12, ignore_eos=True))
    assert [o.output_ids for o in other] != [o.output_ids for o in batch]


def test_eos_stops_and_is_not_returned(engines):
    llm = LLM(str(engines / "tp1"))
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=40, ignore_eos=True))
    # make the model's own 3rd greedy token of row 0 the EOS: the run must stop right before it
    eos = greedy[0].output_ids[2]
    llm.eos_ids = {eos}
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=40))[0]
    assert out.finish_reason == "stop" and out.output_ids == greedy[0].output_ids[:2]
    assert len(out.output_logprobs) == 2


def test_generation_config_defaults_and_overrides(engines, tmp_path):
    import shutil

    engine = tmp_path / "e"
    shutil.copytree(engines / "tp1", engine)
    (engine / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8,
                                                                "eos_token_id": [6, 7]}))
    llm = LLM(str(engine))
    p = SamplingParams(max_tokens=4).resolved(llm.generation_config)
    assert (p.greedy, p.temperature, p.top_p) == (False, 0.7, 0.8)
    p = SamplingParams(max_tokens=4, temperature=0.0).resolved(llm.generation_config)
    assert p.greedy
    assert llm.eos_ids == {6, 7}


def test_top_k_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    for k, p in [(0, 0.9), (5, 1.0), (10, 0.5), (3, 0.3)]:
        ours = filter_top_k_top_p(logits[0].clone(), k, p)
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref[0])), (k, p)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(1, 30)
    seen_ids = torch.tensor([[3, 7, 7, 12, 29]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    seen = torch.zeros(30, dtype=torch.bool)
    seen[seen_ids[0]] = True
    torch.testing.assert_close(apply_repetition_penalty(logits[0].clone(), seen, 1.3), ref[0])


def test_greedy_sampler_picks_argmax_and_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    greedy = SamplingParams(max_tokens=1).resolved(None)
    assert RowSampler(greedy, [0], 4)(logits) == 1
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=0).resolved(None)
    sampler = RowSampler(p, [0], 4)
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(4000)]), minlength=4).float() / 4000
    torch.testing.assert_close(counts, logits.softmax(-1), atol=0.03, rtol=0)


def test_runtime_options_one_object_for_flags_api_and_environment(monkeypatch):
    """Keyword arguments replace single settings of RuntimeOptions; an unknown one is an error, not ignored;
    the settings without a flag take their defaults from the documented environment overrides."""
    from tp_runtime import RuntimeOptions

    base = RuntimeOptions(max_batch_size=3)
    assert base.replace(compile="off").compile == "off" and base.replace(compile="off").max_batch_size == 3
    with pytest.raises(TypeError, match="unknown run-time option.*max_batchsize"):
        base.replace(max_batchsize=4)
    monkeypatch.setenv("TP_RUNTIME_ALL_GUARDS", "1")
    monkeypatch.setenv("TP_RUNTIME_FREEZE", "0")
    monkeypatch.setenv("TP_RUNTIME_NATIVE_ATTENTION", "0")
    opts = RuntimeOptions()
    assert (opts.compile_path, opts.freeze, opts.native_attention) == ("guarded", False, False)
    monkeypatch.delenv("TP_RUNTIME_ALL_GUARDS")
    monkeypatch.delenv("TP_RUNTIME_FREEZE")
    monkeypatch.delenv("TP_RUNTIME_NATIVE_ATTENTION")
    assert (RuntimeOptions().compile_path, RuntimeOptions().freeze, RuntimeOptions().native_attention) == (
        "auto", True, True)


def test_half_precision_only_where_the_cpu_computes_it(monkeypatch):
    """A bf16 / fp16 engine computes in float32 on a CPU without native half precision (capped here to AVX2,
    as on AMD Zen 2/3), and asking for bf16 there anyway warns of the cost."""
    from tp_runtime.runtime.llm import pick_compute_dtype

    cpu_dev = torch.device("cpu")
    monkeypatch.setenv("TP_RUNTIME_ISA", "avx2")
    assert pick_compute_dtype("bfloat16", cpu_dev) == torch.float32
    assert pick_compute_dtype("float16", cpu_dev) == torch.float32
    assert pick_compute_dtype("float32", cpu_dev) == torch.float32
    with pytest.warns(RuntimeWarning, match="--dtype bfloat16 on a CPU without native bfloat16"):
        assert pick_compute_dtype("float32", cpu_dev, "bfloat16") == torch.bfloat16
    monkeypatch.setenv("TP_RUNTIME_ISA", "amx")  # uncapped: whatever this CPU has
    from tp_runtime import cpu
    want = torch.bfloat16 if cpu.native_half("bfloat16") else torch.float32
    assert pick_compute_dtype("bfloat16", cpu_dev) == want


def test_isa_cap_reaches_torch_and_onednn_before_torch_loads():
    """TP_RUNTIME_ISA=avx2 in the environment: `import tp_runtime` sets PyTorch's and oneDNN's own caps before
    torch is imported, so torch dispatches to its AVX2 kernels; a wrong value is a one-line error of the command
    that consults it (here tp-run), naming the choices."""
    import subprocess
    import sys

    from helpers import tool

    code = ("import os, tp_runtime, torch; "
            "print(torch.backends.cpu.get_cpu_capability(), os.environ['ONEDNN_MAX_CPU_ISA'], tp_runtime.cpu.q8_dot())")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, TP_RUNTIME_ISA="avx2"), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["AVX2", "AVX2", "0"]
    res = subprocess.run([tool("tp-run"), "--engine", "/nonexistent", "--input_ids", "1,2"],
                         env=dict(env, TP_RUNTIME_ISA="avx3"), capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "TP_RUNTIME_ISA='avx3' is not one of avx2, avx_vnni, avx512" in res.stderr
