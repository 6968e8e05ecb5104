"""The functions the engine config names, shared by the runtime's model and the converter's reference forward:
the activations by their config name, the rotary embedding's inverse frequencies from the rotary switches
(base, fraction, linear / dynamic NTK / llama3 scaling), and the rotation itself."""

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_inv_freq(head_size: int, rotary_pct: float, rotary_base: float, rotary_scaling: dict | None,
                  max_position_embeddings: int, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (rot_dim / 2,) float32. seq_len matters only to dynamic NTK scaling, which raises the
    base once the sequence outgrows max_position_embeddings."""
    rot_dim = int(head_size * rotary_pct)
    base = rotary_base
    scaling = rotary_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim features, GPT-NeoX style (halves).

    x: (B, T, heads, D); cos/sin: (B, T, 1, rot_dim), rot_dim <= D."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot] if rot < x.shape[-1] else x
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    out = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, x[..., rot:]], dim=-1) if rot < x.shape[-1] else out
