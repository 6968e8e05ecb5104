"""tp-verify: good engines of every family pass at tp 1 and 2, in fp32 and weight-only int8 / int4; an engine with
one altered tensor fails at that layer and names the half (attention, MLP); user mistakes are one line, exit 2.

tp=1 runs main() in this process; tp=2 runs the command alone, which starts its two ranks itself."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from helpers import build_checkpoint, run_ranks
from test_families import tiny, write_as_exaone3, write_as_internlm2
from tp_runtime.cli.verify import main
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.pipeline import convert


def checkpoint(kind: str, root):
    """A tiny random checkpoint of one family in root/hf; its layers differ in window / RoPE where the family can."""
    hf = root / "hf"
    if kind in ("llama", "mistral", "qwen2"):
        kw = {"llama": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
              "mistral": dict(sliding_window=4),
              "qwen2": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)}[kind]
        build_checkpoint(str(hf), kind, seed=1, intermediate_size=128, **kw)
    elif kind == "exaone4":
        from transformers import Exaone4Config, Exaone4ForCausalLM

        tiny(Exaone4Config, Exaone4ForCausalLM, 11, vocab_size=97, hidden_size=64, intermediate_size=128,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, tie_word_embeddings=False, sliding_window=4,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"]).save_pretrained(hf)
    elif kind == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        tiny(GPTNeoXConfig, GPTNeoXForCausalLM, 12, vocab_size=101, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, use_parallel_residual=True,
             rotary_pct=0.25, hidden_act="gelu", tie_word_embeddings=False).save_pretrained(hf)
    elif kind == "exaone3":
        model = build_checkpoint(str(root / "llama"), "llama", seed=13, num_attention_heads=6, num_key_value_heads=3,
                                 hidden_size=48)
        write_as_exaone3(root / "llama", hf, model.config.to_dict())
    else:
        model = build_checkpoint(str(root / "llama"), "llama", seed=14, num_attention_heads=8, num_key_value_heads=2,
                                 hidden_size=64, attention_bias=True)
        write_as_internlm2(root / "llama", hf, model.config.to_dict())
    return hf


FAMILIES = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer",
            "exaone4": "Exaone4DecoderLayer", "gpt_neox": "GPTNeoXLayer", "exaone3": "canonical reference",
            "internlm2": "canonical reference"}


@pytest.fixture
def run_verify(capsys):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    def run(engine, hf, *extra):
        try:
            rc = main(["--engine", str(engine), "--model_dir", str(hf), *extra]) or 0
        except SystemExit as e:
            rc = e.code
        captured = capsys.readouterr()
        return rc, captured.out, captured.err
    return run


def rows(out: str) -> dict:
    """{(layer, half): "ok" | "FAIL"} from the printed table; the logits under ("", "logits")."""
    table = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d*)\s+(attention|MLP|logits)\s.*\s(ok|FAIL)$", line)
        if m:
            table[(m.group(1), m.group(2))] = m.group(3)
    return table


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_family_passes_at_tp1(kind, tmp_path, run_verify):
    hf = checkpoint(kind, tmp_path)
    convert(str(hf), str(tmp_path / "e"), 1, progress=False)
    rc, out, err = run_verify(tmp_path / "e", hf)
    assert rc == 0, out + err
    assert FAMILIES[kind] in out
    table = rows(out)
    n = json.loads((hf / "config.json").read_text()).get("num_hidden_layers") or 2
    assert len(table) == 2 * n + 1 and set(table.values()) == {"ok"}
    assert "PASS" in out


@pytest.mark.parametrize("precision,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_weight_only_engines_pass_with_the_default_limits(precision, group, tmp_path, run_verify):
    hf = tmp_path / "hf"
    build_checkpoint(str(hf), "llama", seed=3, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    convert(str(hf), str(tmp_path / "e"), 1, progress=False, quant=qz.parse_scheme(precision, group))
    rc, out, err = run_verify(tmp_path / "e", hf)
    assert rc == 0, out + err
    assert f"({precision}, tp_size 1" in out


def corrupt(engine, rank: int, name: str, scale: float):
    path = engine / f"rank{rank}.safetensors"
    tensors = load_file(str(path))
    tensors[name] = tensors[name] * scale
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_an_altered_mlp_tensor_fails_at_its_layer(tmp_path, run_verify):
    hf = checkpoint("llama", tmp_path)
    convert(str(hf), str(tmp_path / "e"), 1, progress=False)
    corrupt(tmp_path / "e", 0, "transformer.layers.1.mlp.proj.weight", 1.01)
    rc, out, _ = run_verify(tmp_path / "e", hf)
    assert rc == 1
    table = rows(out)
    assert table[("1", "MLP")] == "FAIL" and table[("0", "MLP")] == table[("1", "attention")] == "ok"
    assert "FAIL: layer 1 MLP" in out


def test_user_mistakes_are_one_line(tmp_path, run_verify):
    hf = checkpoint("llama", tmp_path)
    other = checkpoint("mistral", tmp_path / "m")
    convert(str(hf), str(tmp_path / "e"), 1, progress=False)
    for args, words in ((["--layers", "0,7"], "layers 0..1"), (["--layers", "x"], "comma-separated"),
                        (["--input_ids", "1,2", "3"], "equal length"), (["--input_ids", "1,999"], "vocabulary")):
        rc, _, err = run_verify(tmp_path / "e", hf, *args)
        assert rc == 2 and words in err and "Traceback" not in err, err
    rc, _, err = run_verify(tmp_path / "e", other)
    assert rc == 2 and "was not converted from" in err and "architecture" in err
    rc, _, err = run_verify(tmp_path / "missing", hf)
    assert rc == 2 and "Traceback" not in err


def run_alone(engine, hf, *extra) -> subprocess.CompletedProcess:
    """The command started alone: it starts the engine's tp_size ranks itself."""
    return run_ranks(1, [sys.executable, "-m", "tp_runtime.cli.verify", "--engine", str(engine), "--model_dir", str(hf),
                         *extra], timeout=240)


@pytest.mark.slow
# every family passes at tp 1 above; at tp 2 the ones whose split differs: GQA heads, InternLM2's grouped wqkv
# (the canonical reference), GPT-NeoX's interleaved qkv and parallel residual, EXAONE-4's post-norms and windows
@pytest.mark.parametrize("kind", ["llama", "internlm2", "gpt_neox", "exaone4"])
def test_families_pass_at_tp2(kind, tmp_path):
    hf = checkpoint(kind, tmp_path)
    convert(str(hf), str(tmp_path / "e"), 2, progress=False)
    res = run_alone(tmp_path / "e", hf)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tp_size 2" in res.stdout and set(rows(res.stdout).values()) == {"ok"}


@pytest.mark.slow
def test_altered_tensors_of_one_rank_fail_at_their_layers_at_tp2(tmp_path):
    """Rank 1's mlp.proj of layer 1 and rank 0's qkv of layer 0 altered: exactly those two halves fail, the
    first named; the rest of both layers passes."""
    hf = checkpoint("llama", tmp_path)
    convert(str(hf), str(tmp_path / "good"), 2, progress=False)
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    corrupt(tmp_path / "bad", 1, "transformer.layers.1.mlp.proj.weight", 1.5)
    corrupt(tmp_path / "bad", 0, "transformer.layers.0.attention.qkv.weight", 1.01)
    res = run_alone(tmp_path / "bad", hf)
    assert res.returncode == 1, res.stdout + res.stderr
    table = rows(res.stdout)
    assert table[("0", "attention")] == table[("1", "MLP")] == "FAIL"
    assert table[("0", "MLP")] == table[("1", "attention")] == "ok"
    assert "FAIL: layer 0 attention" in res.stdout
