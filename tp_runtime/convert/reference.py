"""The canonical decoder's forward in plain torch float32, one decoder layer at a time.

Calibration (AWQ) needs the original model's activations without holding the model. This module runs the
canonical decoder the adapters describe (their config fields and CanonicalTensors, the same the converter
writes) a layer at a time: `layer_forward(i, x)` loads layer i's tensors, runs the block on the hidden
states carried from layer i - 1 and frees them on return. Memory: one fp32 layer plus the activations,
whatever the depth. It never builds a whole-model engine and imports nothing of the runtime; the math is
the runtime's (runtime/model.py), restated here for one process and no cache:

    x = embed(ids)
    pre-norm:   h = x + dense(attn(qkv(norm1(x))));    out = h + mlp(norm2(h))
    parallel:   out = x + dense(attn(qkv(norm1(x)))) + mlp(norm2(x))                     (GPT-NeoX)
    post-norm:  h = x + norm1(dense(attn(qkv(x))));    out = h + norm2(mlp(h))           (EXAONE-4)
    mlp(y) = proj(act(fc(y)) * gate(y))  (gated)   or   proj(act(fc(y)))  (plain)
    logits = lm_head(ln_f(x))

with norm1 / norm2 = input_layernorm / post_layernorm (pre-norm) or post_attention_layernorm /
post_feedforward_layernorm (post-norm), RMS or Layer norm (with bias); attention with GQA, optional QK-norm
(RMS over head_size, before RoPE), RoPE on the first rotary_pct of each head (linear / dynamic / llama3
scaling), per layer a sliding window and RoPE on or off.

A record callback sees the inputs of the layer's four linear groups as they are computed:
    "qkv"      the input of attention.qkv                (B, T, hidden)
    "dense"    the input of attention.dense              (B, T, heads * head_size)
    "fc_gate"  the input shared by mlp.fc and mlp.gate   (B, T, hidden)
    "proj"     the input of mlp.proj                     (B, T, intermediate)
"""

import dataclasses

import torch
import torch.nn.functional as F

from tp_runtime.engine import format as ef
from tp_runtime.engine.functions import ACTIVATIONS, apply_rope, rope_inv_freq

LINEAR_INPUTS = ("qkv", "dense", "fc_gate", "proj")

# The canonical switches' defaults: a field an adapter does not emit means what the engine config means.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ef.EngineConfig) if f.default is not dataclasses.MISSING}


class ReferenceDecoder:
    """The canonical decoder of one checkpoint, run a layer at a time in float32 on the CPU.

    tensors: the adapter's CanonicalTensors (a list, or a dict by engine name), global and unsharded;
    cfg: the adapter's canonical config fields (adapter.config()). Nothing is loaded until asked for."""

    def __init__(self, tensors, cfg: dict):
        self.tensors = tensors if isinstance(tensors, dict) else {ct.name: ct for ct in tensors}
        self.cfg = {**_DEFAULTS, **cfg}
        c = self.cfg
        if c["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"activation {c['hidden_act']!r} has no reference; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[c["hidden_act"]]

    def _load(self, name: str):
        """One canonical tensor as float32 ((q, k, v) for qkv), or None when the model has none."""
        ct = self.tensors.get(name)
        if ct is None:
            return None
        t = ct.load(False)
        return tuple(p.float() for p in t) if isinstance(t, tuple) else t.float()

    def layer_weights(self, i: int) -> dict:
        """Layer i's tensors by engine suffix (attention.qkv.weight -> (q, k, v)), float32."""
        prefix = ef.layer_prefix(i) + "."
        return {n[len(prefix):]: self._load(n) for n in self.tensors if n.startswith(prefix)}

    # --- the ends of the model ---

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> hidden states (B, T, hidden)."""
        return F.embedding(ids, self._load(ef.EMBEDDING))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (..., hidden) -> (..., vocab)."""
        x = self._norm(x, self._load(f"{ef.FINAL_NORM}.weight"), self._load(f"{ef.FINAL_NORM}.bias"))
        return F.linear(x, self._load(ef.LM_HEAD))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The whole model, layer by layer: ids (B, T) -> logits (B, T, vocab)."""
        x = self.embed(ids)
        for i in range(self.cfg["num_hidden_layers"]):
            x = self.layer_forward(i, x, positions)
        return self.logits(x)

    # --- one decoder layer ---

    def layer_forward(self, i: int, x: torch.Tensor, positions: torch.Tensor | None = None, record=None,
                      max_tokens: int | None = None) -> torch.Tensor:
        """Decoder layer i on hidden states x (B, T, hidden) -> (B, T, hidden).

        positions: (B, T) or (T,) token positions (default 0..T-1); every row is one whole sequence
        (causal over its own tokens, no padding). record(key, y): called with each linear group's input
        (see LINEAR_INPUTS), chunk by chunk. max_tokens: rows are run in chunks of at most this many
        tokens (at least one row), which bounds the attention scores and the MLP's intermediate.
        The layer's tensors are loaded once and freed on return."""
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(T)
        positions = positions.expand(B, T) if positions.dim() == 1 else positions
        w = self.layer_weights(i)
        rows = B if max_tokens is None else max(1, max_tokens // T)
        out = [self._block(i, w, xc, pc, record)[1]
               for xc, pc in zip(x.split(rows), positions.split(rows), strict=True)]
        del w
        return torch.cat(out) if len(out) > 1 else out[0]

    def layer_stages(self, i: int, x: torch.Tensor, positions: torch.Tensor | None = None):
        """Decoder layer i on x (B, T, hidden) -> (h, out): the hidden state after the attention half of the
        block (x plus the attention branch; for a parallel residual, x + attention alone) and the layer's output.
        tp-verify compares both, to tell an attention error from an MLP one."""
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(T)
        positions = positions.expand(B, T) if positions.dim() == 1 else positions
        w = self.layer_weights(i)
        h, out = self._block(i, w, x, positions, None)
        del w
        return h, out

    def _block(self, i: int, w: dict, x: torch.Tensor, positions: torch.Tensor, record):
        """(h, out): the hidden state after attention, and the layer's output."""
        c = self.cfg
        x = x.float()
        note = record if record is not None else (lambda key, y: None)
        if c["norm_placement"] == "post":
            h = x + self._norm(self._attention(i, w, x, positions, note), w.get("post_attention_layernorm.weight"))
            return h, h + self._norm(self._mlp(w, h, note), w.get("post_feedforward_layernorm.weight"))
        a = self._attention(i, w, self._norm(x, w["input_layernorm.weight"], w.get("input_layernorm.bias")),
                            positions, note)
        h = x + a
        m_in = x if c["parallel_residual"] else h
        m = self._mlp(w, self._norm(m_in, w["post_layernorm.weight"], w.get("post_layernorm.bias")), note)
        return h, h + m

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        eps = self.cfg["norm_epsilon"]
        if self.cfg["norm_type"] == "layer":
            return F.layer_norm(x, weight.shape, weight, bias, eps)
        return F.rms_norm(x, weight.shape, weight, eps)

    def _attention(self, i: int, w: dict, x: torch.Tensor, positions: torch.Tensor, note) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x.shape
        H, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_size"]
        note("qkv", x)
        biases = w.get("attention.qkv.bias") or (None, None, None)
        q, k, v = (F.linear(x, wt, b) for wt, b in zip(w["attention.qkv.weight"], biases, strict=True))
        q = q.view(B, T, H, D)  # (B, T, heads, D)
        k = k.view(B, T, Hkv, D)  # (B, T, kv_heads, D)
        v = v.view(B, T, Hkv, D)
        if c["qk_norm"]:
            eps = c["norm_epsilon"]
            q = F.rms_norm(q, (D,), w["attention.q_layernorm.weight"], eps)
            k = F.rms_norm(k, (D,), w["attention.k_layernorm.weight"], eps)
        if c["rope_per_layer"] is None or c["rope_per_layer"][i]:
            inv_freq = rope_inv_freq(c["head_size"], c["rotary_pct"], c["rotary_base"], c["rotary_scaling"],
                                     c["max_position_embeddings"], int(positions.max()) + 1)
            angles = positions.unsqueeze(-1).float() * inv_freq  # (B, T, rot_dim / 2)
            angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # (B, T, 1, rot_dim)
            q, k = apply_rope(q, angles.cos(), angles.sin()), apply_rope(k, angles.cos(), angles.sin())
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads or kv_heads, T, D)
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, heads, T, D): query head h reads KV head h // group
        v = v.repeat_interleave(H // Hkv, dim=1)
        qpos, kpos = positions.view(B, 1, T, 1), positions.view(B, 1, 1, T)
        mask = kpos <= qpos  # (B, 1, T, T), True = visible
        window = c["sliding_window_per_layer"][i] if c["sliding_window_per_layer"] else None
        if window is not None:
            mask = mask & (kpos > qpos - window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, D)
        o = o.transpose(1, 2).reshape(B, T, H * D)  # (B, T, heads * D)
        note("dense", o)
        return F.linear(o, w["attention.dense.weight"], w.get("attention.dense.bias"))

    def _mlp(self, w: dict, x: torch.Tensor, note) -> torch.Tensor:
        note("fc_gate", x)
        y = self.act(F.linear(x, w["mlp.fc.weight"], w.get("mlp.fc.bias")))
        if self.cfg["gated_mlp"]:
            y = y * F.linear(x, w["mlp.gate.weight"], w.get("mlp.gate.bias"))
        note("proj", y)
        return F.linear(y, w["mlp.proj.weight"], w.get("mlp.proj.bias"))
