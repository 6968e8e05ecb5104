"""A Hugging Face checkpoint run one decoder layer at a time in float32: the reference side of tp-verify.

For the families transformers ships (Llama, Mistral, Qwen2, EXAONE-4, GPT-NeoX: the checkpoint's architecture
class exists in the installed transformers) each layer is transformers' own decoder-layer class: the model is
built on the meta device (no memory), layer i gets its tensors from the checkpoint with
`load_state_dict(..., assign=True)`, runs with transformers' rotary embedding and an explicit causal (and, where
the config says so, sliding-window) mask, and is dropped. Remote-code families (EXAONE-3, InternLM2) and GGUF
files run the canonical reference forward (reference.py) on the adapter's tensors. Either way the embedding and
the final norm + LM head come from reference.py.

    embed(ids) -> x0;   layer(i, x) -> (h, out);   logits(x) -> (..., vocab)

h is the hidden state after the attention half of the block (x + attention, or x + norm(attention) when the
norms follow the blocks), out the layer's output. Memory: one fp32 layer plus the activations.
"""

import torch

from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.checkpoint import open_checkpoint
from tp_runtime.convert.reference import ReferenceDecoder
from tp_runtime.errors import UserError


class LayerReference:
    def __init__(self, model_dir: str):
        self.ckpt = open_checkpoint(model_dir)
        adapter = get_adapter(self.ckpt)
        self.fields = adapter.config()
        self.canonical = ReferenceDecoder(adapter.tensors(self.fields), self.fields)
        self.num_layers = self.fields["num_hidden_layers"]
        self.hf = _TransformersLayers.build(model_dir, self.ckpt)
        self.source = (f"transformers {self.hf.layer_class}" if self.hf is not None
                       else "tp_runtime's canonical reference forward (remote-code family)")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.canonical.embed(ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.canonical.logits(x)

    def layer(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i on x (B, T, hidden), every row one whole sequence from position 0 -> (h, out), float32."""
        x = x.float()
        if self.hf is None:
            return self.canonical.layer_stages(i, x)
        return self.hf.layer(i, x, self.canonical.cfg["norm_placement"] == "post")


class _TransformersLayers:
    """transformers' own decoder layers of one checkpoint, materialized one at a time."""

    @classmethod
    def build(cls, model_dir: str, ckpt):
        import transformers

        archs = ckpt.config.get("architectures") or []
        model_cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        if model_cls is None or ckpt.config.get("model_type") not in transformers.CONFIG_MAPPING:
            return None  # remote code (or a GGUF file): the canonical reference serves
        config = transformers.AutoConfig.from_pretrained(model_dir)
        config._attn_implementation = "eager"  # the mask below is an additive float mask
        return cls(config, model_cls, ckpt)

    def __init__(self, config, model_cls, ckpt):
        self.config, self.ckpt = config, ckpt
        with torch.device("meta"):  # shapes only: each layer is given real tensors when it runs
            self.meta = model_cls(config)
        base = self.meta.base_model
        self.layers = base.layers
        self.prefix = f"{self.meta.base_model_prefix}.layers."
        self.layer_class = type(self.layers[0]).__name__
        self.rotary = type(base.rotary_emb)(config=config)  # real inv_freq, built on the CPU
        self.names = list(ckpt.names())

    def window(self, i: int) -> int | None:
        """Layer i's sliding window as transformers' config says (layer_types where it has them)."""
        c = self.config
        types = getattr(c, "layer_types", None)
        if types:
            return c.sliding_window if types[i] == "sliding_attention" else None
        return getattr(c, "sliding_window", None)

    def layer(self, i: int, x: torch.Tensor, post_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        prefix = f"{self.prefix}{i}."
        state = {n[len(prefix):]: self.ckpt.load(n).float() for n in self.names if n.startswith(prefix)}
        if not state:
            raise UserError(f"the checkpoint has no tensors named {prefix}*; is it a {self.layer_class} checkpoint?")
        layer = self.layers[i]
        try:
            layer.load_state_dict(state, assign=True, strict=True)
        except RuntimeError as e:
            raise UserError(f"layer {i} of the checkpoint does not fit transformers' {self.layer_class}: "
                            f"{str(e).splitlines()[0]}") from None
        del state
        positions = torch.arange(T).expand(B, T)
        qpos, kpos = positions.view(B, 1, T, 1), positions.view(B, 1, 1, T)
        visible = kpos <= qpos  # (B, 1, T, T)
        w = self.window(i)
        if w:
            visible = visible & (kpos > qpos - w)
        mask = torch.zeros(B, 1, T, T).masked_fill(~visible, torch.finfo(torch.float32).min)
        attn = getattr(layer, "self_attn", None) or layer.attention
        seen = {}
        if post_norm:  # h = x + norm(attention(x)) is the MLP's input
            hook = layer.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
        else:  # h = x + attention(norm(x))
            hook = attn.register_forward_hook(lambda m, args, out: seen.__setitem__("h", x + out[0]))
        try:
            with torch.no_grad():
                cos, sin = self.rotary(x, positions)
                out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        finally:
            hook.remove()
            layer.to_empty(device="meta")  # free the tensors: the next call assigns new ones
        out = out[0] if isinstance(out, tuple) else out
        return seen["h"], out
