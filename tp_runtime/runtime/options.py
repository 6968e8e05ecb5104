"""RuntimeOptions: every run-time setting of an engine in one typed object.

tp-run, tp-serve and tp-eval build it from their flags (cli/run.py's add_runtime_args), RayEngine ships it to
its actors, and the Python API builds it from LLM's keyword arguments. The few settings without a flag take
their defaults from the documented environment overrides (tp_runtime/env.py), read once, here.
"""

import dataclasses
from dataclasses import dataclass, field

from tp_runtime import env
from tp_runtime.distributed.comm import DEFAULT_TIMEOUT_S as DEFAULT_COMM_TIMEOUT_S
from tp_runtime.runtime.kv_cache import DEFAULT_BLOCK_SIZE


@dataclass
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    tp_size: int | None = None  # ranks to run on; another tp than the engine's re-slices it at load (reslice.py)
    threads: int | None = None  # torch threads per rank (None: the rank's cores less reserve_cores)
    max_batch_size: int | None = None  # None: the engine's
    max_seq_len: int | None = None  # the longest sequence (prompt + output); None: the engine's
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV-cache block
    kv_cache_memory: int | None = None  # bytes of KV cache per rank; None: max_batch_size x max_seq_len tokens
    prefix_cache: bool = True  # requests reuse the cached blocks of a shared prompt prefix
    max_num_tokens: int | None = None  # prompt tokens per prefill step (longer prompts in chunks); None: no limit
    streaming_window: int | None = None  # StreamingLLM: the latest positions a sequence keeps; None: off
    sink_tokens: int = 4  # StreamingLLM: the first positions a sequence keeps (whole blocks)
    dtype: str = "auto"  # compute dtype; auto: the engine's, float32 on CPUs without native bf16 / fp16
    tokenizer_dir: str | None = None  # None: the engine directory
    comm_timeout_s: float = DEFAULT_COMM_TIMEOUT_S  # seconds before a collective gives up
    comm: str = "auto"  # auto | shm | gloo (CPU)
    bind: str = "auto"  # auto | numa | cores | none
    reserve_cores: int = 0  # cores per rank left free of torch threads
    compile: str = "auto"  # auto | on | off: torch.compile the decode step
    woq_kernel: str = "auto"  # the weight-only matmul kernel, or auto (probed, timed)
    decode_steps: int | None = None  # the most decode steps this engine will run, where known (one-shot runs)
    # environment overrides (tp_runtime/env.py), no flags
    compile_path: str = field(default_factory=env.compile_path)  # runtime/compile.py's PATHS
    freeze: bool = field(default_factory=env.freeze)  # compiled weights as constants
    native_attention: bool = field(default_factory=env.native_attention)

    def replace(self, **changes) -> "RuntimeOptions":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown run-time option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)
