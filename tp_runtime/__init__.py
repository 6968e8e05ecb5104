"""tp_runtime: a tensor-parallel LLM inference runtime.

    tp-convert  shards a Hugging Face checkpoint into an engine directory (one file per rank)
    tp-run      runs an engine under mpirun, torchrun, or alone
    LLM         the same runtime as a Python API
"""

__version__ = "0.1.0"

from tp_runtime.llm import LLM, RequestOutput  # noqa: E402
from tp_runtime.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]
