"""Synthetic checkpoints: random weights at a model's true shapes, as a Hugging Face folder of its family.

So the converter and the runtime run at real widths (hidden 6144, 48 or 64 heads) on a small
machine: keep the preset's widths and cut the layer count.

    python -m tp_runtime.synthetic --config internlm2-20b --output_dir /tmp/ilm2-20b-2l --num_layers 2

Shapes and names come from the family's published checkpoint layout: transformers' own class on the
meta device for the families it ships (Llama, Mistral, Qwen2, EXAONE-4, GPT-NeoX), and the layout of
the remote-code checkpoints for EXAONE-3 and InternLM2. Tensors are written one at a time, so a
checkpoint of many GB never sits in memory. `source_shapes` alone (no data) serves tp-plan.
"""

import argparse
import copy
import json
import os
import sys

import torch

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError, exit_on_user_error, read_json_object
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
    return shapes


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


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and ("norm" in name or "ln_" in name or "layernorm" in name) and name.endswith("weight"):
        return (1 + 0.1 * (torch.rand(shape, generator=gen) - 0.5)).to(dtype)
    scale = 0.1 if name.endswith("bias") else 0.02
    return (scale * torch.randn(shape, generator=gen)).to(dtype)


def write_synthetic(cfg: dict, output_dir: str, num_layers: int | None = None, dtype: str = "bfloat16",
                    seed: int = 0, progress: bool = True) -> dict:
    """Write config.json + model.safetensors with random weights; returns the written config."""
    dtypes = ef.DTYPES
    if dtype not in dtypes:
        raise UserError(f"--dtype must be one of {', '.join(dtypes)}")
    if os.path.exists(output_dir):
        raise UserError(f"{output_dir} exists; remove it first")
    cfg = with_layers(cfg, num_layers)
    cfg["torch_dtype"] = dtype
    shapes = source_shapes(cfg)
    os.makedirs(output_dir)
    specs = [(name, dtypes[dtype], shape) for name, shape in shapes.items()]
    writer = StreamingSafetensorsWriter(os.path.join(output_dir, "model.safetensors"), specs, {"format": "pt"})
    gen = torch.Generator().manual_seed(seed)
    from tqdm import tqdm

    for name, shape in tqdm(shapes.items(), desc="synthesizing", unit="tensor", disable=not progress, file=sys.stderr):
        writer.write(name, random_tensor(name, shape, dtypes[dtype], gen))
    writer.close()
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if not k.startswith("_")}, f, indent=2)
    return cfg


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tp_runtime.synthetic",
                                description="Write a random-weight Hugging Face checkpoint at a preset's true shapes.")
    p.add_argument("--config", required=True, help="preset name (configs/NAME.json), a .json file or a model folder")
    p.add_argument("--output_dir", required=True, help="Hugging Face folder to write")
    p.add_argument("--num_layers", type=int, default=None, help="cut the layer count (default: the preset's)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default %(default)s)")
    args = p.parse_args(argv)
    write_synthetic(load_preset(args.config), args.output_dir, args.num_layers, args.dtype, args.seed)
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
