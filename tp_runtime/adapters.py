"""Family adapters: a Hugging Face checkpoint -> the canonical decoder's config and tensors.

Each adapter knows one family's config keys and tensor names, and nothing else does. It yields
canonical tensors (global, unsharded) with their partition rule; the converter slices them.
Adding a family means adding an adapter here (and, where its math is new, a switch of the
canonical config), never a branch in the runtime.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from tp_runtime import engine_format as ef
from tp_runtime.checkpoint import Checkpoint
from tp_runtime.errors import UserError

# Partition rules, applied by the converter (see partition.py).
# COLUMN splits the MLP's intermediate dim; ROW_ATTN splits dense's input by the rank's query
# heads, ROW_MLP splits proj's input by the rank's intermediate columns.
REPLICATE, COLUMN, ROW_ATTN, ROW_MLP, QKV, VOCAB = "replicate", "column", "row_attn", "row_mlp", "qkv", "vocab"


@dataclass
class CanonicalTensor:
    name: str  # engine tensor name
    rule: str  # one of the rules above
    # load(meta) -> tensor, or (q, k, v) for QKV. meta=True returns tensors on the meta device
    # (shapes and dtypes only), which the converter uses to plan the rank files before reading data.
    load: Callable[[bool], object]


def _fetch(ckpt: Checkpoint, name: str):
    def load(meta: bool):
        if meta:
            return torch.empty(ckpt.shape(name), dtype=ckpt.dtype(name), device="meta")
        return ckpt.load(name)

    return load


def _fetch_qkv(ckpt: Checkpoint, q: str, k: str, v: str):
    loaders = [_fetch(ckpt, n) for n in (q, k, v)]
    return lambda meta: tuple(f(meta) for f in loaders)


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either transformers-5 `rope_parameters` or the older keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf["rope_scaling"]) if isinstance(hf.get("rope_scaling"), dict) else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        scaling.pop("type", None)
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise UserError(f"rope scaling type {kind!r} is not supported yet (supported: default, linear, llama3)")
    return theta, scaling


def _eos_list(value) -> list | None:
    if value is None:
        return None
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class LlamaAdapter:
    """LlamaForCausalLM (SmolLM2 included), MistralForCausalLM, Qwen2ForCausalLM."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def __init__(self, ckpt: Checkpoint, architecture: str):
        self.ckpt = ckpt
        self.arch = architecture
        self.hf = ckpt.config

    def _get(self, key, default=None, required=True):
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if required and default is None:
            raise UserError(f"config.json of this {self.arch} has no {key!r}; the model config is incomplete")
        return default

    def config(self) -> dict:
        hf = self.hf
        heads = int(self._get("num_attention_heads"))
        hidden = int(self._get("hidden_size"))
        layers = int(self._get("num_hidden_layers"))
        theta, scaling = rope_settings(hf)
        qkv_bias = bool(hf.get("attention_bias", False)) or self.arch == "Qwen2ForCausalLM"
        gen = self.ckpt.generation_config or {}
        eos = _eos_list(gen.get("eos_token_id", hf.get("eos_token_id")))
        return dict(
            architecture="LlamaForCausalLM",
            source_architecture=self.arch,
            vocab_size=int(self._get("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(self._get("num_key_value_heads", heads)),
            head_size=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(self._get("intermediate_size")),
            max_position_embeddings=int(self._get("max_position_embeddings", 4096)),
            hidden_act=str(hf.get("hidden_act", "silu")),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            rotary_base=theta,
            rotary_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            norm_type="rms",
            gated_mlp=True,
            qkv_bias=qkv_bias,
            dense_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window_per_layer=self._sliding_windows(layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def _sliding_windows(self, layers: int) -> list | None:
        hf = self.hf
        window = hf.get("sliding_window")
        if not window:
            return None
        types = hf.get("layer_types")
        if isinstance(types, list) and len(types) == layers:
            out = [int(window) if t == "sliding_attention" else None for t in types]
        elif self.arch == "Qwen2ForCausalLM":
            if not hf.get("use_sliding_window", False):
                return None
            first = int(hf.get("max_window_layers", layers))
            out = [int(window) if i >= first else None for i in range(layers)]
        else:
            out = [int(window)] * layers
        return out if any(w is not None for w in out) else None

    def tensors(self, cfg: dict) -> list[CanonicalTensor]:
        ck = self.ckpt
        out = [CanonicalTensor(ef.EMBEDDING, REPLICATE, _fetch(ck, "model.embed_tokens.weight"))]
        for i in range(cfg["num_hidden_layers"]):
            src, dst = f"model.layers.{i}", ef.layer_prefix(i)
            attn = f"{src}.self_attn"
            out.append(CanonicalTensor(f"{dst}.input_layernorm.weight", REPLICATE,
                                       _fetch(ck, f"{src}.input_layernorm.weight")))
            out.append(CanonicalTensor(f"{dst}.attention.qkv.weight", QKV,
                                       _fetch_qkv(ck, *(f"{attn}.{p}_proj.weight" for p in "qkv"))))
            if cfg["qkv_bias"]:
                out.append(CanonicalTensor(f"{dst}.attention.qkv.bias", QKV,
                                           _fetch_qkv(ck, *(f"{attn}.{p}_proj.bias" for p in "qkv"))))
            out.append(CanonicalTensor(f"{dst}.attention.dense.weight", ROW_ATTN, _fetch(ck, f"{attn}.o_proj.weight")))
            if cfg["dense_bias"]:
                out.append(CanonicalTensor(f"{dst}.attention.dense.bias", REPLICATE, _fetch(ck, f"{attn}.o_proj.bias")))
            out.append(CanonicalTensor(f"{dst}.post_layernorm.weight", REPLICATE,
                                       _fetch(ck, f"{src}.post_attention_layernorm.weight")))
            for ours, theirs in (("fc", "gate_proj"), ("gate", "up_proj")):
                out.append(CanonicalTensor(f"{dst}.mlp.{ours}.weight", COLUMN, _fetch(ck, f"{src}.mlp.{theirs}.weight")))
                if cfg["mlp_bias"]:
                    out.append(CanonicalTensor(f"{dst}.mlp.{ours}.bias", COLUMN, _fetch(ck, f"{src}.mlp.{theirs}.bias")))
            out.append(CanonicalTensor(f"{dst}.mlp.proj.weight", ROW_MLP, _fetch(ck, f"{src}.mlp.down_proj.weight")))
            if cfg["mlp_bias"]:
                out.append(CanonicalTensor(f"{dst}.mlp.proj.bias", REPLICATE, _fetch(ck, f"{src}.mlp.down_proj.bias")))
        out.append(CanonicalTensor(f"{ef.FINAL_NORM}.weight", REPLICATE, _fetch(ck, "model.norm.weight")))
        head = "model.embed_tokens.weight" if cfg["tie_word_embeddings"] or "lm_head.weight" not in ck else "lm_head.weight"
        out.append(CanonicalTensor(ef.LM_HEAD, VOCAB, _fetch(ck, head)))
        return out


ADAPTERS = {arch: LlamaAdapter for arch in LlamaAdapter.architectures}


def get_adapter(ckpt: Checkpoint):
    archs = ckpt.config.get("architectures") or []
    if not archs:
        model_type = ckpt.config.get("model_type")
        guess = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        archs = [guess[model_type]] if model_type in guess else []
    for arch in archs:
        if arch in ADAPTERS:
            return ADAPTERS[arch](ckpt, arch)
    raise UserError(
        f"unsupported architecture {archs[0] if archs else ckpt.config.get('model_type', '?')!r}; "
        f"supported: {', '.join(sorted(ADAPTERS))}"
    )
