"""The environment variables tp_runtime reads: each a documented override of a default, read here and nowhere
else (the launchers' own variables aside: distributed/launch.py reads those). No torch, no package imports:
tp_runtime/cpu.py reads the ISA cap before torch is loaded.

    TP_RUNTIME_CACHE              where fetched models, the kernel timing cache and compile times live
                                  (default ~/.cache/tp_runtime)
    TP_RUNTIME_ISA                cap the instruction sets used (tp_runtime/cpu.py)
    TP_RUNTIME_COMPILE            auto | on | off: what --compile auto means
    TP_RUNTIME_FREEZE             0: the compiled step keeps its weights as graph inputs (default: frozen constants)
    TP_RUNTIME_ALL_GUARDS         1: the compiled step checks all of Dynamo's guards on every call
    TP_RUNTIME_NATIVE             0: never build or use tp_runtime's C++ kernels
    TP_RUNTIME_NATIVE_ATTENTION   0: the decode attention in torch ops instead of the native kernel
    TP_RUNTIME_API_KEY            tp-serve's API key when --api_key is not given
"""

import os

VARIABLES = ("TP_RUNTIME_CACHE", "TP_RUNTIME_ISA", "TP_RUNTIME_COMPILE", "TP_RUNTIME_FREEZE", "TP_RUNTIME_ALL_GUARDS",
             "TP_RUNTIME_NATIVE", "TP_RUNTIME_NATIVE_ATTENTION", "TP_RUNTIME_API_KEY")


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def cache_dir() -> str:
    return _get("TP_RUNTIME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tp_runtime")


def isa_cap() -> str:
    return _get("TP_RUNTIME_ISA").lower()


def compile_mode() -> str:
    """What --compile auto means: auto (the default), on or off; validated by the caller."""
    return _get("TP_RUNTIME_COMPILE", "auto") or "auto"


def freeze() -> bool:
    return _get("TP_RUNTIME_FREEZE", "1") != "0"


def compile_path() -> str:
    return "guarded" if _get("TP_RUNTIME_ALL_GUARDS", "0") == "1" else "auto"


def native_kernels() -> bool:
    return _get("TP_RUNTIME_NATIVE", "1") != "0"


def native_attention() -> bool:
    return _get("TP_RUNTIME_NATIVE_ATTENTION", "1") != "0"


def api_key() -> str | None:
    return _get("TP_RUNTIME_API_KEY") or None
