"""tp_runtime: a tensor-parallel LLM inference runtime.

    tp-convert  shards a Hugging Face checkpoint into an engine directory (one file per rank)
    tp-run      runs an engine under mpirun, torchrun, or alone
    LLM         the same runtime as a Python API
    RayEngine   the same runtime on Ray actors, driven from one process (imported on first use: needs ray)
"""

__version__ = "0.1.0"

from tp_runtime import cpu as _cpu  # noqa: E402

_cpu.apply_to_environment()  # TP_RUNTIME_ISA caps torch's and oneDNN's kernels too: before torch is imported

from tp_runtime.runtime.llm import LLM, RequestOutput  # noqa: E402
from tp_runtime.runtime.options import RuntimeOptions  # noqa: E402
from tp_runtime.runtime.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "RayEngine", "RequestOutput", "RuntimeOptions", "SamplingParams", "__version__"]


def __getattr__(name):
    if name == "RayEngine":  # lazily, so that `import tp_runtime` never imports ray
        from tp_runtime.runtime.ray_engine import RayEngine

        return RayEngine
    raise AttributeError(f"module 'tp_runtime' has no attribute {name!r}")
