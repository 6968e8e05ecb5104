"""Family adapters: a Hugging Face checkpoint -> the canonical decoder's config and tensors.

Each adapter knows one family's config keys and tensor names, and nothing else does. It yields
canonical tensors (global, unsharded) with their partition rule; the converter slices them.
Adding a family means adding an adapter here (and, where its math is new, a switch of the
canonical config), never a branch in the runtime.
"""

from tp_runtime.convert.adapters.base import CanonicalTensor, DecoderAdapter  # noqa: F401
from tp_runtime.convert.adapters.exaone import Exaone4Adapter, ExaoneAdapter
from tp_runtime.convert.adapters.gpt_neox import GPTNeoXAdapter
from tp_runtime.convert.adapters.internlm2 import InternLM2Adapter
from tp_runtime.convert.adapters.llama import LlamaAdapter
from tp_runtime.convert.checkpoint import Checkpoint
from tp_runtime.errors import UserError

ADAPTER_CLASSES = (LlamaAdapter, ExaoneAdapter, Exaone4Adapter, InternLM2Adapter, GPTNeoXAdapter)
ADAPTERS = {arch: cls for cls in ADAPTER_CLASSES for arch in cls.architectures}
MODEL_TYPES = {mt: arch for cls in ADAPTER_CLASSES for mt, arch in getattr(cls, "model_types", {}).items()}


def get_adapter(ckpt: Checkpoint) -> DecoderAdapter:
    archs = ckpt.config.get("architectures") or []
    if not archs and ckpt.config.get("model_type") in MODEL_TYPES:
        archs = [MODEL_TYPES[ckpt.config["model_type"]]]
    for arch in archs:
        if arch in ADAPTERS:
            return ADAPTERS[arch](ckpt, arch)
    name = archs[0] if archs else ckpt.config.get("model_type", "?")
    raise UserError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ADAPTERS))}")
