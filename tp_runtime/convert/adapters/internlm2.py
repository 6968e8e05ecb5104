"""InternLM2 (InternLM2ForCausalLM, remote code on the Hub; 1.8B / 7B / 20B).

Llama math with other names and one fused tensor:
    model.tok_embeddings, model.layers.{i}.attention_norm, .attention.wqkv, .attention.wo,
    .ffn_norm, .feed_forward.w1 (gate, activated) / .w3 (up) / .w2 (down), model.norm, output
`wqkv` is grouped per KV head: for each of the num_key_value_heads groups, its
num_attention_heads / num_key_value_heads query heads, then its key head, then its value head,
each head_dim rows. It is de-interleaved here, at conversion, never at run time.
Its tokenizer is remote code too: the engine loads its tokenizer.model as a SentencePiece
LlamaTokenizer, and the remote .py is never run. A checkpoint that ships a tokenizer.json and no
tokenizer.model (a synthetic one) keeps the class its tokenizer_config.json names.
"""

import os

from tp_runtime.convert.adapters.base import DecoderAdapter, fetch
from tp_runtime.errors import UserError


def split_grouped_wqkv(w, num_heads: int, num_kv_heads: int, head_dim: int):
    """(kv_heads * (group + 2) * head_dim, ...) -> q (heads * head_dim, ...), k, v (kv_heads * head_dim, ...)."""
    group = num_heads // num_kv_heads
    expected = (num_heads + 2 * num_kv_heads) * head_dim
    if w.shape[0] != expected:
        raise UserError(
            f"InternLM2 wqkv has {w.shape[0]} rows, but the config's {num_heads} heads, {num_kv_heads} KV heads "
            f"and head_dim {head_dim} need (heads + 2 x KV heads) x head_dim = {expected}"
        )
    rest = tuple(w.shape[1:])
    grouped = w.reshape(num_kv_heads, group + 2, head_dim, *rest)  # (kv_heads, group + 2, head_dim, ...)
    q = grouped[:, :group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, group].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


class InternLM2Adapter(DecoderAdapter):
    architectures = ("InternLM2ForCausalLM",)
    model_types = {"internlm2": "InternLM2ForCausalLM"}

    @property
    def tokenizer_overrides(self) -> dict | None:
        """tokenizer_config.json keys the engine's copy rewrites: only a SentencePiece tokenizer.model is
        read as LlamaTokenizer (a LlamaTokenizer built from a byte-level tokenizer.json would not be it)."""
        if os.path.isfile(os.path.join(self.ckpt.tokenizer_dir, "tokenizer.model")):
            return {"tokenizer_class": "LlamaTokenizer", "auto_map": None}
        return None

    def config(self) -> dict:
        bias = bool(self.hf.get("bias", False))
        return dict(self.dims(max_positions=2048), architecture="LlamaForCausalLM", qkv_bias=bias, dense_bias=bias)

    def _wqkv(self, name: str, cfg: dict):
        src = fetch(self.ckpt, name)
        heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
        return lambda meta: split_grouped_wqkv(src(meta), heads, kv, d)

    def embedding(self):
        return fetch(self.ckpt, "model.tok_embeddings.weight")

    def layer(self, i: int, cfg: dict) -> dict:
        ck, src = self.ckpt, f"model.layers.{i}"
        out = {
            "input_layernorm.weight": fetch(ck, f"{src}.attention_norm.weight"),
            "attention.qkv.weight": self._wqkv(f"{src}.attention.wqkv.weight", cfg),
            "attention.dense.weight": fetch(ck, f"{src}.attention.wo.weight"),
            "post_layernorm.weight": fetch(ck, f"{src}.ffn_norm.weight"),
            "mlp.fc.weight": fetch(ck, f"{src}.feed_forward.w1.weight"),
            "mlp.gate.weight": fetch(ck, f"{src}.feed_forward.w3.weight"),
            "mlp.proj.weight": fetch(ck, f"{src}.feed_forward.w2.weight"),
        }
        if cfg["qkv_bias"]:
            out["attention.qkv.bias"] = self._wqkv(f"{src}.attention.wqkv.bias", cfg)
            out["attention.dense.bias"] = fetch(ck, f"{src}.attention.wo.bias")
        return out

    def final_norm(self) -> dict:
        return {"weight": fetch(self.ckpt, "model.norm.weight")}

    def lm_head(self, cfg: dict):
        tied = cfg["tie_word_embeddings"] or "output.weight" not in self.ckpt
        return fetch(self.ckpt, "model.tok_embeddings.weight" if tied else "output.weight")
