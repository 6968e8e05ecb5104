"""Re-slicing at load: an engine converted at tp N and re-sliced for M ranks holds, tensor for tensor, what the
same checkpoint converted at tp M holds (runtime/reslice.py), for every family whose split differs and every
precision; impossible sizes are refused before anything loads; and a re-sliced engine generates what the
engine converted at that tp generates.

The slicing is checked in one process, a target rank at a time (no ranks needed); one test runs tp-run.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from helpers import build_checkpoint, random_prompts, tp_run_json
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.pipeline import convert
from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError
from tp_runtime.runtime.reslice import Reslicer

CPU = torch.device("cpu")
# heads 8 / KV 2 (head 16): KV split at tp 2, replicated at tp 4; every row-parallel slice in whole groups of 32
# at tp 1, 2 and 4; vocabulary 101 padded to 102 at tp 2 and to 104 at tp 4
LLAMA = dict(vocab_size=101, hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2)
# heads 6 / KV 3: uneven KV split at tp 2 (2 + 1 groups), uneven MLP at tp 3 (34, 33, 33), q/k/v biases
QWEN2 = dict(vocab_size=101, hidden_size=96, intermediate_size=100, num_attention_heads=6, num_key_value_heads=3)
PAIRS = ((2, 1), (1, 2), (2, 4), (4, 2))


def gpt_neox(path):
    """GPT-NeoX: layer norms with biases, biases on every linear, one head per rank at tp 4."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(3)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rotary_pct=0.25, hidden_act="gelu", tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)


CHECKPOINTS = {
    "llama": lambda p: build_checkpoint(p, "llama", seed=1, **LLAMA),
    "llama-tied-bf16": lambda p: build_checkpoint(p, "llama", seed=2, dtype=torch.bfloat16, tie_word_embeddings=True,
                                                  **LLAMA),
    "qwen2": lambda p: build_checkpoint(p, "qwen2", seed=4, **QWEN2),
    "gpt-neox": gpt_neox,
}
def awq_prequant_scheme():
    """int4 g32 whose AWQ scales could not be folded: a prequant factor (in,) on every linear of LLAMA's layers
    (replicated with qkv / fc / gate, split with dense's and proj's inputs). No calibration: the factors are given."""
    from tp_runtime.convert.awq import AwqResult

    g = torch.Generator().manual_seed(5)
    widths = {"attention.qkv": 128, "attention.dense": 128, "mlp.fc": 128, "mlp.gate": 128, "mlp.proj": 256}
    pre = {f"{ef.layer_prefix(i)}.{m}.weight": torch.rand(w, generator=g) + 0.5
           for i in range(2) for m, w in widths.items()}
    return dataclasses.replace(qz.parse_scheme("int4", 32, algo="awq"), awq=AwqResult(prequant=pre))


QUANT = {
    "fp32": {},
    "int8": dict(quant=qz.parse_scheme("int8", quantize_lm_head=True)),
    "int4-g32-zero": dict(quant=qz.parse_scheme("int4", 32, zero_point=True, quantize_lm_head="int4")),
    "int4-g32": dict(quant=qz.parse_scheme("int4", 32)),
    "int4-awq-prequant": dict(quant=awq_prequant_scheme()),
    "parallel-embedding": dict(parallel_embedding=True),
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """engines(family, precision, tp) -> an engine directory, converted once per module."""
    root, made = tmp_path_factory.mktemp("reslice"), {}

    def get(family: str, precision: str, tp: int) -> str:
        hf = root / family
        if not hf.exists():
            CHECKPOINTS[family](str(hf))
        key = (family, precision, tp)
        if key not in made:
            made[key] = str(root / f"{family}-{precision}-tp{tp}")
            convert(str(hf), made[key], tp, progress=False, max_seq_len=64, **QUANT[precision])
        return made[key]

    return get


def assert_resliced_equal(source: str, target: str) -> None:
    """Every rank of `source` re-sliced for the target's tp holds exactly the target's tensors, and its config
    is the target's."""
    want = ef.EngineConfig.load(target)
    rs = Reslicer(source, ef.EngineConfig.load(source), want.tp_size)
    assert dataclasses.asdict(rs.config) == dataclasses.asdict(want)
    for r in range(want.tp_size):
        converted = load_file(f"{target}/{ef.rank_file(r)}")
        tensors = rs.rank_tensors(r, torch.float32, CPU)
        assert sorted(tensors) == sorted(converted), f"rank {r}"
        entries = {n: (dt, shape) for n, dt, shape in rs.entries(r)}
        for name, expected in converted.items():
            got = tensors.assemble(name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), f"rank {r} {name}"
            assert entries[name] == (expected.dtype, tuple(expected.shape)), f"rank {r} {name}"
        tensors.close()


@pytest.mark.parametrize("family,precision", [("llama", "fp32"), ("llama", "int8"), ("llama", "int4-g32-zero"),
                                              ("llama", "int4-g32"), ("llama", "int4-awq-prequant"),
                                              ("llama-tied-bf16", "fp32"),
                                              ("llama-tied-bf16", "parallel-embedding"), ("gpt-neox", "fp32"),
                                              ("gpt-neox", "int8")])
def test_resliced_equals_converted(engines, family, precision):
    for n, m in PAIRS:
        assert_resliced_equal(engines(family, precision, n), engines(family, precision, m))


def test_a_rank_reads_only_the_files_it_needs(engines):
    def files(source, m):
        rs = Reslicer(source, ef.EngineConfig.load(source), m)
        return [[int(p.rsplit("rank", 1)[1].split(".")[0]) for p in rs.source_paths(r)] for r in range(m)]

    # heads and MLP columns: ranks 0-1 of 4 are rank 0 of 2; the lm_head's vocabulary rows (26 a rank at tp 4,
    # 51 at tp 2) cross: rank 1 of 2 starts at row 51, which rank 1 of 4 holds
    assert files(engines("llama", "fp32", 4), 2) == [[0, 1], [1, 2, 3]]
    assert files(engines("llama", "fp32", 2), 4) == [[0], [0, 1], [1], [1]]  # rank 1 of 4 ends at row 52
    assert files(engines("llama", "fp32", 1), 2) == [[0], [0]]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_uneven_splits_reslice(engines, precision):
    """Uneven KV groups (tp 2) and uneven MLP columns (tp 3) on both sides of a re-slicing."""
    for n, m in ((2, 3), (3, 2), (1, 3), (3, 1)):
        assert_resliced_equal(engines("qwen2", precision, n), engines("qwen2", precision, m))


def test_gpt_neox_int4_reslices_within_its_groups(engines):
    """int4 g32 on 64-wide attention inputs: tp 1 <-> 2 keeps whole groups, tp 4 would cut them."""
    assert_resliced_equal(engines("gpt-neox", "int4-g32", 1), engines("gpt-neox", "int4-g32", 2))
    assert_resliced_equal(engines("gpt-neox", "int4-g32", 2), engines("gpt-neox", "int4-g32", 1))
    with pytest.raises(UserError, match=r"of attention.dense cuts the int4 groups of group_size 32; .* allow --tp_size 1, 2$"):
        Reslicer(engines("gpt-neox", "int4-g32", 2), ef.EngineConfig.load(engines("gpt-neox", "int4-g32", 2)), 4)


def test_impossible_tp_sizes_are_refused(engines):
    engine = engines("llama", "fp32", 2)
    cfg = ef.EngineConfig.load(engine)
    heads = r"--tp_size 3: re-slicing .* \(converted at tp_size=2\): LlamaForCausalLM: cannot split.*valid tp sizes: 1, 2, 4, 8"
    with pytest.raises(UserError, match=heads):
        Reslicer(engine, cfg, 3)
    with pytest.raises(UserError, match="must be >= 1"):
        Reslicer(engine, cfg, 0)
    int4 = engines("llama", "int4-g32", 1)
    with pytest.raises(UserError, match=r"rank 0's input slice \[0, 16\) of attention.dense cuts the int4 groups of group_size 32; .* allow --tp_size 1, 2, 4$"):
        Reslicer(int4, ef.EngineConfig.load(int4), 8)  # 16 attention inputs a rank


def test_world_size_must_match_the_asked_tp_size(engines):
    from tp_runtime import LLM

    with pytest.raises(UserError, match=r"converted at tp_size=1\) is asked for --tp_size 2, but 1 rank\(s\) were"):
        LLM(engines("llama", "fp32", 1), tp_size=2, compile="off", bind="none")


def test_a_resliced_engine_generates_as_the_converted_one(engines):
    """tp 2 -> 1 in this process: the re-sliced engine's greedy ids and log-probs are the tp-1 engine's."""
    from helpers import in_process_outputs
    from tp_runtime import LLM, SamplingParams

    prompts = random_prompts(101, 7)
    want = in_process_outputs(engines("llama", "fp32", 1), prompts, 6)["outputs"]
    llm = LLM(engines("llama", "fp32", 2), tp_size=1, compile="off", bind="none")
    try:
        assert llm.config.tp_size == 1 and llm.config.vocab_size_padded == 101
        got = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    finally:
        llm.close()
    for w, g in zip(want, got, strict=True):
        assert g.output_ids == w["output_ids"]
        assert g.output_logprobs == pytest.approx(w["output_logprobs"], abs=1e-5)


@pytest.mark.slow
def test_tp_run_reslices_a_tp1_engine_for_two_ranks(engines):
    prompts = [",".join(map(str, p)) for p in random_prompts(101, 9)]
    args = ["--input_ids", *prompts, "--max_output_len", "6", "--ignore_eos"]
    want = tp_run_json(engines("llama", "fp32", 2), 2, args)
    got = tp_run_json(engines("llama", "fp32", 1), 2, ["--tp_size", "2", *args])
    for w, g in zip(want["outputs"], got["outputs"], strict=True):
        assert g["output_ids"] == w["output_ids"]
        assert g["output_logprobs"] == pytest.approx(w["output_logprobs"], abs=1e-5)
