"""EXAONE-3.0 / 3.5 / EXAONE-Deep (ExaoneForCausalLM, remote code) and EXAONE-4.0 (Exaone4ForCausalLM).

EXAONE-3 is Llama math under other names:
    transformer.wte, transformer.h.{i}.ln_1, .attn.attention.{q,k,v,out}_proj, .ln_2,
    .mlp.c_fc_0 (gate, activated) / .c_fc_1 (up) / .c_proj, transformer.ln_f, lm_head
    config: num_layers, layer_norm_epsilon (an RMSNorm), activation_function, rope_theta, rope_scaling
EXAONE-4 (as transformers' Exaone4 code does it):
    QK-norm (RMSNorm over head_dim on q and k, before RoPE); norms after attention and after the
    MLP, none before (h = x + norm(attn(x)); h = h + norm(mlp(h))); hybrid attention: when
    `sliding_window` is set, "sliding_attention" layers use RoPE and the window and the other
    layers are global with no RoPE; when it is null every layer is full attention with RoPE.
"""

from tp_runtime.convert.adapters.base import DecoderAdapter, fetch, fetch_qkv
from tp_runtime.convert.adapters.llama import LlamaAdapter
from tp_runtime.errors import UserError


class ExaoneAdapter(DecoderAdapter):
    architectures = ("ExaoneForCausalLM",)
    model_types = {"exaone": "ExaoneForCausalLM"}

    def config(self) -> dict:
        return dict(self.dims(layers="num_layers", act="activation_function", eps="layer_norm_epsilon",
                              eps_default=1e-5), architecture="LlamaForCausalLM")

    def embedding(self):
        return fetch(self.ckpt, "transformer.wte.weight")

    def layer(self, i: int, cfg: dict) -> dict:
        ck, src = self.ckpt, f"transformer.h.{i}"
        attn = f"{src}.attn.attention"
        return {
            "input_layernorm.weight": fetch(ck, f"{src}.ln_1.weight"),
            "attention.qkv.weight": fetch_qkv(ck, *(f"{attn}.{p}_proj.weight" for p in "qkv")),
            "attention.dense.weight": fetch(ck, f"{attn}.out_proj.weight"),
            "post_layernorm.weight": fetch(ck, f"{src}.ln_2.weight"),
            "mlp.fc.weight": fetch(ck, f"{src}.mlp.c_fc_0.weight"),
            "mlp.gate.weight": fetch(ck, f"{src}.mlp.c_fc_1.weight"),
            "mlp.proj.weight": fetch(ck, f"{src}.mlp.c_proj.weight"),
        }

    def final_norm(self) -> dict:
        return {"weight": fetch(self.ckpt, "transformer.ln_f.weight")}

    def lm_head(self, cfg: dict):
        tied = cfg["tie_word_embeddings"] or "lm_head.weight" not in self.ckpt
        return fetch(self.ckpt, "transformer.wte.weight" if tied else "lm_head.weight")


class Exaone4Adapter(LlamaAdapter):
    architectures = ("Exaone4ForCausalLM",)
    model_types = {"exaone4": "Exaone4ForCausalLM"}

    def config(self) -> dict:
        cfg = super().config()
        layers = cfg["num_hidden_layers"]
        window = self.hf.get("sliding_window")
        cfg.update(qkv_bias=False, dense_bias=False, mlp_bias=False, qk_norm=True, norm_placement="post")
        if window:
            sliding = self._sliding_layers(layers)
            cfg["sliding_window_per_layer"] = [int(window) if s else None for s in sliding]
            cfg["rope_per_layer"] = list(sliding)  # global layers: no RoPE
        else:
            cfg["sliding_window_per_layer"] = None
            cfg["rope_per_layer"] = None
        return cfg

    def _sliding_layers(self, layers: int) -> list[bool]:
        types = self.hf.get("layer_types")
        if isinstance(types, list):
            if len(types) != layers:
                raise UserError(f"layer_types has {len(types)} entries for {layers} layers")
            return [t == "sliding_attention" for t in types]
        pattern = self.get("sliding_window_pattern")
        if isinstance(pattern, str):  # e.g. "LLLG": L = local (sliding), G = global
            return [pattern[i % len(pattern)] == "L" for i in range(layers)]
        return [(i + 1) % int(pattern) != 0 for i in range(layers)]  # every pattern-th layer is global

    def layer(self, i: int, cfg: dict) -> dict:
        ck, src = self.ckpt, f"model.layers.{i}"
        out = super().layer(i, cfg)
        del out["input_layernorm.weight"], out["post_layernorm.weight"]
        out["attention.q_layernorm.weight"] = fetch(ck, f"{src}.self_attn.q_norm.weight")
        out["attention.k_layernorm.weight"] = fetch(ck, f"{src}.self_attn.k_norm.weight")
        out["post_attention_layernorm.weight"] = fetch(ck, f"{src}.post_attention_layernorm.weight")
        out["post_feedforward_layernorm.weight"] = fetch(ck, f"{src}.post_feedforward_layernorm.weight")
        return out
