"""What every family adapter shares: partition rules, lazy tensor loaders, config reading, and
the canonical tensor list built from a per-layer map of engine names to source loaders."""

from dataclasses import dataclass
from typing import Callable

import torch

from tp_runtime.engine import format as ef
from tp_runtime.convert.checkpoint import Checkpoint
from tp_runtime.convert.partition import COLUMN, QKV, REPLICATE, ROW_ATTN, ROW_MLP, VOCAB
from tp_runtime.errors import UserError


# Per-layer engine tensors (suffixes of transformer.layers.{i}) in file order, with their rule.
LAYER_ROLES = (
    ("input_layernorm.weight", REPLICATE),
    ("input_layernorm.bias", REPLICATE),
    ("attention.qkv.weight", QKV),
    ("attention.qkv.bias", QKV),
    ("attention.q_layernorm.weight", REPLICATE),
    ("attention.k_layernorm.weight", REPLICATE),
    ("attention.dense.weight", ROW_ATTN),
    ("attention.dense.bias", REPLICATE),  # row-parallel bias: replicated, added once after the all-reduce
    ("post_attention_layernorm.weight", REPLICATE),
    ("post_layernorm.weight", REPLICATE),
    ("post_layernorm.bias", REPLICATE),
    ("mlp.fc.weight", COLUMN),
    ("mlp.fc.bias", COLUMN),
    ("mlp.gate.weight", COLUMN),
    ("mlp.gate.bias", COLUMN),
    ("mlp.proj.weight", ROW_MLP),
    ("mlp.proj.bias", REPLICATE),
    ("post_feedforward_layernorm.weight", REPLICATE),
)
RULES = dict(LAYER_ROLES)

Loader = Callable[[bool], object]  # load(meta) -> tensor, or (q, k, v) for QKV


@dataclass
class CanonicalTensor:
    name: str  # engine tensor name
    rule: str  # one of the rules above
    # load(meta) -> tensor, or (q, k, v) for QKV. meta=True returns tensors on the meta device
    # (shapes and dtypes only), which the converter uses to plan the rank files before reading data.
    load: Loader


def fetch(ckpt: Checkpoint, name: str) -> Loader:
    def load(meta: bool):
        return ckpt.meta(name) if meta else ckpt.load(name)

    return load


def fetch_qkv(ckpt: Checkpoint, q: str, k: str, v: str) -> Loader:
    loaders = [fetch(ckpt, n) for n in (q, k, v)]
    return lambda meta: tuple(f(meta) for f in loaders)


def rope_settings(hf: dict, theta_key: str = "rope_theta") -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either transformers-5 `rope_parameters` or the older keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = float(hf.get(theta_key, 10000.0))
        scaling = dict(hf["rope_scaling"]) if isinstance(hf.get("rope_scaling"), dict) else None
    if scaling is not None:
        kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
        scaling["rope_type"] = kind
        if kind == "default":
            return theta, None
        if kind not in SUPPORTED_ROPE:
            raise UserError(f"rope scaling type {kind!r} is not supported; supported: default, {', '.join(SUPPORTED_ROPE)}")
        missing = [k for k in SUPPORTED_ROPE[kind] if k not in scaling]
        if missing:
            raise UserError(f"rope scaling {kind!r} needs {', '.join(missing)} in the model config")
    return theta, scaling


SUPPORTED_ROPE = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def eos_list(value) -> list | None:
    if value is None:
        return None
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class DecoderAdapter:
    """Base of the family adapters. A family says how to read its config (config()) and where
    each canonical tensor of layer i comes from (layer(i)); this class builds the ordered list."""

    architectures: tuple[str, ...] = ()

    def __init__(self, ckpt: Checkpoint, architecture: str):
        self.ckpt = ckpt
        self.arch = architecture
        self.hf = ckpt.config

    def get(self, key: str, default=None):
        """A config value; without a default, a missing key is an error naming it."""
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if default is None:
            raise UserError(f"config.json of this {self.arch} has no {key!r}, which its adapter needs")
        return default

    def common(self) -> dict:
        """Fields every family reads the same way (generation settings, token ids)."""
        gen = self.ckpt.generation_config or {}
        return dict(
            source_architecture=self.arch,
            bos_token_id=self.hf.get("bos_token_id"),
            eos_token_id=eos_list(gen.get("eos_token_id", self.hf.get("eos_token_id"))),
            pad_token_id=self.hf.get("pad_token_id"),
        )

    def dims(self, layers: str = "num_hidden_layers", act: str = "hidden_act", act_default: str = "silu",
             eps: str = "rms_norm_eps", eps_default: float = 1e-6, max_positions: int = 4096,
             theta_key: str = "rope_theta") -> dict:
        """The fields every family reads the same way but under its own key names: token ids, sizes, heads
        (KV heads default to the query heads, head size to hidden / heads), activation, norm epsilon, RoPE,
        tied embeddings."""
        heads = int(self.get("num_attention_heads"))
        hidden = int(self.get("hidden_size"))
        theta, scaling = rope_settings(self.hf, theta_key)
        return dict(
            **self.common(),
            vocab_size=int(self.get("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(self.get(layers)),
            num_attention_heads=heads,
            num_key_value_heads=int(self.get("num_key_value_heads", heads)),
            head_size=int(self.hf.get("head_dim") or hidden // heads),
            intermediate_size=int(self.get("intermediate_size")),
            max_position_embeddings=int(self.get("max_position_embeddings", max_positions)),
            hidden_act=str(self.get(act, act_default)),
            norm_epsilon=float(self.get(eps, eps_default)),
            rotary_base=theta,
            rotary_scaling=scaling,
            tie_word_embeddings=bool(self.hf.get("tie_word_embeddings", False)),
        )

    def config(self) -> dict:
        raise NotImplementedError

    # --- tensors ---

    def embedding(self) -> Loader:
        raise NotImplementedError

    def layer(self, i: int, cfg: dict) -> dict[str, Loader]:
        """Engine suffix (see LAYER_ROLES) -> loader, for the tensors this layer has."""
        raise NotImplementedError

    def final_norm(self) -> dict[str, Loader]:
        raise NotImplementedError

    def lm_head(self, cfg: dict) -> Loader:
        raise NotImplementedError

    def tensors(self, cfg: dict) -> list[CanonicalTensor]:
        out = [CanonicalTensor(ef.EMBEDDING, REPLICATE, self.embedding())]
        for i in range(cfg["num_hidden_layers"]):
            sources = self.layer(i, cfg)
            unknown = set(sources) - set(RULES)
            assert not unknown, f"adapter bug: unknown engine tensors {unknown}"
            prefix = ef.layer_prefix(i)
            out += [CanonicalTensor(f"{prefix}.{suffix}", rule, sources[suffix])
                    for suffix, rule in LAYER_ROLES if suffix in sources]
        out += [CanonicalTensor(f"{ef.FINAL_NORM}.{k}", REPLICATE, v) for k, v in self.final_norm().items()]
        out.append(CanonicalTensor(ef.LM_HEAD, VOCAB, self.lm_head(cfg)))
        return out
