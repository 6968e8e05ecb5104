"""The engine directory: its config.json schema, tensor names and integrity checks.

Shared by the converter (which writes engines) and the runtime (which reads them); it imports
neither. The layout follows TensorRT-LLM's unified checkpoint:

    ENGINE/config.json            architecture, dtype, dims, mapping, quantization + canonical switches
    ENGINE/rank{r}.safetensors    exactly the tensors rank r needs
    ENGINE/tokenizer*.json ...    copied from the source, so the directory is self-contained

Fields beyond TensorRT-LLM's schema are added, never renamed: `format_version`, the canonical
decoder switches, and the per-rank split sizes (`heads_per_rank`, `kv_heads_per_rank`,
`intermediate_size_per_rank`), which make uneven splits explicit.
"""

import dataclasses
import json
import os
import struct
from dataclasses import dataclass, field

import torch

from tp_runtime.engine import functions

from tp_runtime.errors import UserError, read_json_object

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


# Engine storage / compute dtypes by their config.json names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Activations the canonical decoder implements (functions.py maps each to its function).
ACTIVATIONS = tuple(functions.ACTIVATIONS)


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


# Tensor names (TensorRT-LLM's, for the Llama-type decoder).
EMBEDDING = "transformer.vocab_embedding.weight"
FINAL_NORM = "transformer.ln_f"
LM_HEAD = "lm_head.weight"


def layer_prefix(i: int) -> str:
    return f"transformer.layers.{i}"


# Weight-only quantized linears (see quantize.py for the scheme): `P.weight` holds integer codes, beside
# TensorRT-LLM's scale tensors. int8: P.weight int8 (out, in), P.per_channel_scale (out,) [, P.zero (out,)];
# int8 per group (GGUF's Q8_0): P.weights_scaling_factor (out, in / group) beside the int8 codes.
# int4: P.weight uint8 (out, in / 2), two codes 0..15 a byte, input 2j in the low nibble;
# P.weights_scaling_factor (out, in / group) [, P.zero uint8 (out, in / group)]. Symmetric zeros: 0 / 8.
# A float minimum per group instead of a zero (GGUF's Q4_1): P.minimum float32 (out, in / group), and
# w = code * scale + minimum. AWQ scales that could not be folded: P.prequant_scaling_factor (in,),
# multiplies the activation first. Scales and minima stay float32 whatever the engine dtype; the codes' dtype
# (int8 or uint8) tells the precision.
# SmoothQuant (quant_algo W8A8_SQ_*): int8 linears as above whose activations are rounded to int8 too, per
# token, or with a static step P.act_scale float32 (1,); the linears of quantization.weight_only_modules (whose
# smoothing had no fold) are plain W8A16.
INT8_SCALE, INT4_SCALE = "per_channel_scale", "weights_scaling_factor"
ZERO, PREQUANT, MINIMUM, ACT_SCALE = "zero", "prequant_scaling_factor", "minimum", "act_scale"
GROUP_SCALE = INT4_SCALE  # the per-group scale of either precision
QUANT_SUFFIXES = tuple(f".{s}" for s in (INT8_SCALE, INT4_SCALE, ZERO, PREQUANT, MINIMUM, ACT_SCALE))
SQ_PREFIX = "W8A8_SQ_"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) uint8, input 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) uint8 codes 0..15."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1)  # (out, in / 2, 2)
    return out.reshape(packed.shape[0], packed.shape[1] * 2)


@dataclass
class EngineConfig:
    """config.json of an engine. Global sizes and per-rank sizes are named apart."""

    architecture: str  # the canonical decoder's name in TensorRT-LLM terms, e.g. LlamaForCausalLM
    source_architecture: str  # what the Hugging Face config said
    dtype: str  # storage dtype of the rank files: float32 | bfloat16 | float16
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str = "silu"
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "rope_gpt_neox"
    rotary_base: float = 10000.0
    rotary_scaling: dict | None = None
    rotary_pct: float = 1.0
    tie_word_embeddings: bool = False
    use_parallel_embedding: bool = False  # TensorRT-LLM's flag: the embedding split by vocab rows like lm_head
    embedding_sharding_dim: int = 0
    mapping: dict = field(default_factory=lambda: {"world_size": 1, "tp_size": 1, "pp_size": 1})
    quantization: dict = field(
        default_factory=lambda: {
            "quant_algo": None,
            "group_size": None,
            "has_zero_point": False,
            "exclude_modules": None,
        }
    )
    # --- canonical decoder switches (additions to TensorRT-LLM's schema) ---
    format_version: int = FORMAT_VERSION
    norm_type: str = "rms"  # rms | layer (with bias)
    # pre:  h = x + attn(input_layernorm(x));  out = h + mlp(post_layernorm(h))
    # post: h = x + post_attention_layernorm(attn(x));  out = h + post_feedforward_layernorm(mlp(h))
    norm_placement: str = "pre"
    parallel_residual: bool = False  # out = x + attn(input_layernorm(x)) + mlp(post_layernorm(x))
    gated_mlp: bool = True  # act(fc(x)) * gate(x), then proj
    qkv_bias: bool = False
    dense_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_size on every q and k head, before RoPE
    # Per-layer attention window (None = full attention). Mistral: every layer the same window.
    sliding_window_per_layer: list | None = None
    # Per-layer RoPE switch (None = RoPE everywhere). EXAONE-4 hybrid: global layers have none.
    rope_per_layer: list | None = None
    # --- per-rank split sizes ---
    vocab_size_padded: int = 0
    heads_per_rank: list = field(default_factory=list)
    kv_heads_per_rank: list = field(default_factory=list)
    intermediate_size_per_rank: list = field(default_factory=list)
    # --- run-time defaults recorded at conversion ---
    max_seq_len: int = 4096
    max_batch_size: int = 8
    bos_token_id: int | None = None
    eos_token_id: list | None = None
    pad_token_id: int | None = None

    @property
    def tp_size(self) -> int:
        return int(self.mapping["tp_size"])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, engine_dir: str) -> None:
        with open(os.path.join(engine_dir, CONFIG_NAME), "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, engine_dir: str) -> "EngineConfig":
        path = os.path.join(engine_dir, CONFIG_NAME)
        if not os.path.isdir(engine_dir):
            raise UserError(f"engine directory {engine_dir!r} does not exist (create it with tp-convert)")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: {engine_dir!r} is not an engine directory (create one with tp-convert)")
        raw = read_json_object(path, "re-run tp-convert to rebuild the engine")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(
                f"{path} has format_version {version!r}, this tp_runtime reads version {FORMAT_VERSION}; "
                "re-run tp-convert with this version"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise UserError(f"{path} is missing fields ({e}); re-run tp-convert to rebuild the engine") from None
        cfg.validate(path)
        return cfg

    def validate(self, where: str = CONFIG_NAME) -> None:
        tp = self.tp_size
        problems = []
        if len(self.heads_per_rank) != tp or len(self.kv_heads_per_rank) != tp:
            problems.append(f"heads_per_rank/kv_heads_per_rank must have tp_size={tp} entries")
        if len(self.intermediate_size_per_rank) != tp:
            problems.append(f"intermediate_size_per_rank must have tp_size={tp} entries")
        if self.vocab_size_padded % tp or self.vocab_size_padded < self.vocab_size:
            problems.append(f"vocab_size_padded={self.vocab_size_padded} must be >= vocab_size and a multiple of {tp}")
        for name in ("sliding_window_per_layer", "rope_per_layer"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_hidden_layers:
                problems.append(f"{name} must have one entry per layer")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.norm_placement not in ("pre", "post") or self.norm_type not in ("rms", "layer"):
            problems.append(f"norm_placement {self.norm_placement!r} / norm_type {self.norm_type!r} unknown")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16")
        if problems:
            raise UserError(f"{where} is inconsistent: " + "; ".join(problems) + "; re-run tp-convert")


# ---------------------------------------------------------------------------
# safetensors header checks (cheap: header and file size only, no tensor data read)

# safetensors' dtype codes, as the engine's files and Hugging Face checkpoints use them
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """Return (header, data_start). Raises UserError on a missing, truncated or corrupt file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is truncated ({size} bytes); re-run tp-convert")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise UserError(f"{path} is truncated or not a safetensors file; re-run tp-convert")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; re-run tp-convert to rebuild the engine") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} has a corrupt header; re-run tp-convert") from None
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise UserError(
            f"{path} is truncated: {size} bytes, its header needs {data_start + end}; re-run tp-convert"
        )
    return header, data_start


def check_rank_files(engine_dir: str, tp_size: int) -> None:
    """Every rank checks every rank file, so all ranks fail alike before any collective starts."""
    for r in range(tp_size):
        read_safetensors_header(os.path.join(engine_dir, rank_file(r)))
