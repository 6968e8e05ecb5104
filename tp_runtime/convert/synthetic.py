"""Synthetic checkpoints: random weights at a model's true shapes, as a Hugging Face folder of its family.

So the converter and the runtime run at real widths (hidden 6144, 48 or 64 heads) on a small
machine: keep the preset's widths and cut the layer count, or keep the full depth.

    python -m tp_runtime.synthetic --config internlm2-20b --output_dir /tmp/ilm2-20b-2l --num_layers 2

Shapes and names come from the family's published checkpoint layout: transformers' own class on the
meta device for the families it ships (Llama, Mistral, Qwen2, EXAONE-4, GPT-NeoX: its per-head
interleaved `query_key_value`), and the layout of the remote-code checkpoints for EXAONE-3 and
InternLM2 (its `wqkv` grouped per KV head). Tensors are generated and written a block of rows at a
time, so neither a checkpoint nor one of its tensors ever sits whole in memory; they are split into
`model-0000i-of-0000K.safetensors` files of at most --shard_size bytes with a
`model.safetensors.index.json`, as real checkpoints of this size come (one file: `model.safetensors`).
A byte-level BPE tokenizer at the preset's vocabulary size comes with it (synthetic_tokenizer.py).
`source_shapes` alone (no data) serves tp-plan.

The init keeps a deep model's activations finite and non-degenerate, so greedy decoding wanders
through the vocabulary instead of repeating one id. With C the hidden size, L the layer count,
and fan_in a matrix's input width (all normal, mean 0, unless stated):
    - input projections (q, k, v, gate, up, fc): std 1/sqrt(fan_in), so each output is about unit RMS
      given a unit-RMS normed input; attention scores then have std about 1;
    - output projections (o_proj / wo / dense / down_proj / w2 / c_proj / dense_4h_to_h): std
      1/sqrt(fan_in) / sqrt(2L), as GPT-2 and Megatron scale them: the 2L residual branches together
      add at most about unit variance, so the residual stream's RMS stays within a small factor with depth;
    - norm weights near 1 (mean 1, std 0.05); norm biases std 0.02; biases of input projections std 0.1,
      of output projections 0.1/sqrt(2L). Norms applied to a branch's output before the residual add
      (EXAONE-4's post-norms) play the output projection's part: weights near 1/sqrt(2L);
    - embedding std 1, so the residual starts at RMS 1 and the current token drives the next; a separate
      LM head std 1/sqrt(C) (unit-variance logits). A tied embedding is the LM head too, and its rows would
      score their own token far above the rest (one id forever): there the final norm's weights carry a
      random sign each (|w| near 1), which makes a token's score against itself average zero.
Measured on full-depth presets cut to hidden 64 (tests/test_synthetic.py): the residual RMS grows from
about 1.0 after the first layer to 1.2 after the last (InternLM2 48 layers, GPT-NeoX 44).
"""

import argparse
import copy
import json
import math
import os
import sys

import torch

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError, exit_on_user_error, read_json_object
from tp_runtime.memory import parse_size
from tp_runtime.convert.writer import StreamingSafetensorsWriter

CONFIG_DIRS = (os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"), "configs")


def load_preset(name_or_path: str) -> dict:
    """A preset name (configs/NAME.json), a .json file, or a Hugging Face folder with config.json."""
    candidates = [name_or_path, os.path.join(name_or_path, "config.json")]
    candidates += [os.path.join(d, f"{name_or_path}.json") for d in CONFIG_DIRS]
    for path in candidates:
        if os.path.isfile(path):
            return read_json_object(path, "a preset is a model's config.json")
    names = sorted({f[:-5] for d in CONFIG_DIRS if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".json")})
    raise UserError(f"no preset, .json file or model folder {name_or_path!r}; presets: {', '.join(names)}")


def _architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise UserError("the config has no 'architectures' entry")
    return archs[0]


# Names a class uses in memory that its published checkpoints spell otherwise (transformers >= 5 renames
# GPT-NeoX's embed_out to lm_head on load, and back on save_pretrained).
HUB_NAMES = {"GPTNeoXForCausalLM": {"lm_head.weight": "embed_out.weight"}}


def _transformers_shapes(cfg: dict) -> dict[str, tuple]:
    from transformers import AutoConfig, AutoModelForCausalLM

    clean = {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "auto_map")}
    pattern = clean.get("sliding_window_pattern")
    if isinstance(pattern, str) and not clean.get("layer_types"):  # "LLLG": transformers wants layer_types
        n = clean["num_hidden_layers"]
        clean["layer_types"] = ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention"
                                for i in range(n)]
    config = AutoConfig.for_model(clean.pop("model_type"), **clean)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    renames = HUB_NAMES.get(_architecture(cfg), {})
    return {renames.get(k, k): v for k, v in shapes.items()}


def _exaone3_shapes(cfg: dict) -> dict[str, tuple]:
    H, K = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    C, V, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    D = cfg.get("head_dim") or C // H
    out = {"transformer.wte.weight": (V, C)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.h.{i}"
        out.update({f"{p}.ln_1.weight": (C,), f"{p}.attn.attention.q_proj.weight": (H * D, C),
                    f"{p}.attn.attention.k_proj.weight": (K * D, C), f"{p}.attn.attention.v_proj.weight": (K * D, C),
                    f"{p}.attn.attention.out_proj.weight": (C, H * D), f"{p}.ln_2.weight": (C,),
                    f"{p}.mlp.c_fc_0.weight": (inter, C), f"{p}.mlp.c_fc_1.weight": (inter, C),
                    f"{p}.mlp.c_proj.weight": (C, inter)})
    out["transformer.ln_f.weight"] = (C,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (V, C)
    return out


def _internlm2_shapes(cfg: dict) -> dict[str, tuple]:
    H, K = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    C, V, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    D = C // H
    out = {"model.tok_embeddings.weight": (V, C)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update({f"{p}.attention_norm.weight": (C,), f"{p}.attention.wqkv.weight": ((H + 2 * K) * D, C),
                    f"{p}.attention.wo.weight": (C, H * D), f"{p}.ffn_norm.weight": (C,),
                    f"{p}.feed_forward.w1.weight": (inter, C), f"{p}.feed_forward.w3.weight": (inter, C),
                    f"{p}.feed_forward.w2.weight": (C, inter)})
        if cfg.get("bias", False):
            out.update({f"{p}.attention.wqkv.bias": ((H + 2 * K) * D,), f"{p}.attention.wo.bias": (C,)})
    out["model.norm.weight"] = (C,)
    if not cfg.get("tie_word_embeddings", False):
        out["output.weight"] = (V, C)
    return out


REMOTE_LAYOUTS = {"ExaoneForCausalLM": _exaone3_shapes, "InternLM2ForCausalLM": _internlm2_shapes}


def source_shapes(cfg: dict) -> dict[str, tuple]:
    """Tensor name -> shape of a checkpoint of this config, in the family's own layout."""
    arch = _architecture(cfg)
    if arch in REMOTE_LAYOUTS:
        return REMOTE_LAYOUTS[arch](cfg)
    return _transformers_shapes(cfg)


def with_layers(cfg: dict, num_layers: int | None) -> dict:
    out = dict(cfg)
    if num_layers is not None:
        key = "num_layers" if "num_layers" in cfg else "num_hidden_layers"
        out[key] = num_layers
        if isinstance(cfg.get("layer_types"), list):
            out["layer_types"] = cfg["layer_types"][:num_layers]
    return out


EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.tok_embeddings.weight",
              "gpt_neox.embed_in.weight")
LM_HEADS = ("lm_head.weight", "output.weight", "embed_out.weight")
FINAL_NORMS = ("model.norm.weight", "transformer.ln_f.weight", "gpt_neox.final_layer_norm.weight")
OUTPUT_PROJECTIONS = (".o_proj.", ".down_proj.", ".out_proj.", ".c_proj.", ".wo.", ".w2.", ".attention.dense.",
                      ".dense_4h_to_h.")
POST_NORMS = {"Exaone4ForCausalLM": (".post_attention_layernorm.", ".post_feedforward_layernorm.")}
ROWS_PER_BLOCK = 1 << 24  # elements generated at a time (64 MB of float32)


def num_layers_of(cfg: dict) -> int:
    return cfg["num_layers"] if "num_layers" in cfg else cfg["num_hidden_layers"]


def init_distribution(name: str, shape: tuple, cfg: dict, tied: bool) -> tuple[float, float, bool]:
    """(mean, std, random_sign) of a tensor's init: normal(mean, std), times a random sign per element
    when random_sign; see the module docstring."""
    depth = 1 / math.sqrt(2 * num_layers_of(cfg))
    is_output = any(p in name for p in OUTPUT_PROJECTIONS)
    if name in EMBEDDINGS:
        return 0.0, 1.0, False
    if name in LM_HEADS:
        return 0.0, 1 / math.sqrt(shape[1]), False
    if len(shape) == 1 and ("norm" in name or "ln_" in name):
        if name.endswith("bias"):
            return 0.0, 0.02, False
        post = any(p in name for p in POST_NORMS.get(_architecture(cfg), ()))
        mean = depth if post else 1.0
        return mean, 0.05 * mean, tied and name in FINAL_NORMS
    if name.endswith("bias"):
        return 0.0, 0.1 * (depth if is_output else 1.0), False
    return 0.0, (depth if is_output else 1.0) / math.sqrt(shape[-1]), False


def random_blocks(shape: tuple, mean: float, std: float, random_sign: bool, dtype: torch.dtype,
                  gen: torch.Generator):
    """Blocks of rows of a normal(mean, std) tensor (times random signs when random_sign); the values depend
    on the shape, never on how a checkpoint is split into files."""
    per_row = math.prod(shape[1:])
    step = max(1, ROWS_PER_BLOCK // max(per_row, 1))
    for start in range(0, shape[0], step):
        rows = (min(step, shape[0] - start), *shape[1:])
        block = torch.randn(rows, generator=gen).mul_(std).add_(mean)
        if random_sign:
            block.mul_(torch.randint(0, 2, rows, generator=gen).mul_(2).sub_(1))
        yield block.to(dtype)


def shard_files(specs: list[tuple[str, torch.dtype, tuple]], shard_size: int) -> list[tuple[str, list]]:
    """Tensors in order, cut into files of at most shard_size bytes (a bigger tensor has a file of its own),
    named as transformers' save_pretrained names them."""
    groups, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_synthetic(cfg: dict, output_dir: str, num_layers: int | None = None, dtype: str = "bfloat16",
                    seed: int = 0, progress: bool = True, shard_size: int | str = "5GB",
                    tokenizer: bool = True) -> dict:
    """Write config.json + the weights (one file, or shards with an index) with random weights, and a
    tokenizer when `tokenizer` and the vocabulary can hold one; returns the written config."""
    dtypes = ef.DTYPES
    if dtype not in dtypes:
        raise UserError(f"--dtype must be one of {', '.join(dtypes)}")
    shard_bytes = parse_size(shard_size, "--shard_size") if isinstance(shard_size, str) else int(shard_size)
    if shard_bytes <= 0:
        raise UserError(f"--shard_size must be positive, not {shard_size!r}")
    if os.path.exists(output_dir):
        raise UserError(f"{output_dir} exists; remove it first")
    if num_layers is not None and num_layers < 1:
        raise UserError(f"--num_layers must be at least 1, not {num_layers}")
    cfg = with_layers(cfg, num_layers)
    cfg["torch_dtype"] = dtype
    shapes = source_shapes(cfg)
    tied = not any(name in shapes for name in LM_HEADS)
    os.makedirs(output_dir)
    files = shard_files([(name, dtypes[dtype], shape) for name, shape in shapes.items()], shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    from tqdm import tqdm

    bar = tqdm(total=len(shapes), desc="synthesizing", unit="tensor", disable=not progress, file=sys.stderr)
    for fname, specs in files:
        writer = StreamingSafetensorsWriter(os.path.join(output_dir, fname), specs, {"format": "pt"})
        for name, _, shape in specs:
            writer.write_rows(name, random_blocks(shape, *init_distribution(name, shape, cfg, tied), dtypes[dtype], gen))
            bar.update(1)
        writer.close()
    bar.close()
    if len(files) > 1:
        total = sum(math.prod(shape) * dtypes[dtype].itemsize for shape in shapes.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: fname for fname, specs in files for name, _, _ in specs}}
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if not k.startswith("_")}, f, indent=2)
    if tokenizer:
        from tp_runtime.convert import synthetic_tokenizer

        if synthetic_tokenizer.can_train(cfg["vocab_size"], cfg):
            synthetic_tokenizer.write_tokenizer(cfg, output_dir, seed)
        elif progress:
            print(f"no tokenizer: a vocabulary of {cfg['vocab_size']} cannot hold the 256 byte tokens",
                  file=sys.stderr)
    return cfg


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tp_runtime.synthetic",
                                description="Write a random-weight Hugging Face checkpoint at a preset's true shapes, "
                                            "with a byte-level BPE tokenizer of its vocabulary size.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="preset name (configs/NAME.json), a .json file or a model folder")
    p.add_argument("--output_dir", required=True, help="Hugging Face folder to write (must not exist)")
    p.add_argument("--num_layers", type=int, default=None, help="layer count (None: the preset's, full depth)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the tokenizer's fill")
    p.add_argument("--shard_size", default="5GB",
                   help="largest weight file (bytes, or 5GB / 4GiB / 500MB); more files get "
                        "model.safetensors.index.json")
    p.add_argument("--no_tokenizer", action="store_true", help="write no tokenizer files")
    args = p.parse_args(argv)
    write_synthetic(load_preset(args.config), args.output_dir, args.num_layers, args.dtype, args.seed,
                    shard_size=args.shard_size, tokenizer=not args.no_tokenizer)
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
