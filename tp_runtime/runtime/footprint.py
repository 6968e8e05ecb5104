"""What a rank holds in memory once loaded, known before anything is loaded: its weights as the runtime keeps
them, its KV cache, and the runtime's own share. tp-run checks the sum against the host's memory before it
reads a weight; tp-plan prints the same figures for a model not yet converted.

    weights   each tensor of the rank file as the model keeps it: quantized codes, scales and zeros as
              stored (the kernels re-lay them out at the same size); float tensors in the compute dtype
              (a bf16 engine on a CPU without native bf16 computes, and so keeps, float32: twice its file)
    KV cache  the pool's blocks (runtime/kv_cache.py: --kv_cache_memory, else max_batch_size sequences of
              max_seq_len, plus block 0) x 2 (keys, values) x layers x kv_heads_per_rank x block_size
              x head_size x the compute dtype's size
    runtime   Python, torch and the tokenizer, the decode step's activations and scratch (RUNTIME_BYTES)

The weights' kernel layouts may differ from the file by a few percent (a padded tile, scales repeated
per 32 inputs for native_int4): the figure is the file's, which the measured RSS after load is compared
against (after a generation has touched every weight) in benchmarks/bench_20b.py.
"""

import torch

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError
from tp_runtime.runtime import kv_cache

GiB = 1 << 30
MiB = 1 << 20
# Python + torch + tokenizers + tp_runtime imported, threads started, the step's scratch: measured as a rank's
# resident memory (anonymous + mapped libraries) beside its weights and cache, 2 ranks on one host (tests/test_plan.py).
RUNTIME_BYTES = 360 * MiB

def read_header(path: str) -> dict:
    """A rank file's header: {name: {"dtype": "BF16", "shape": [...], ...}} (no tensor data read)."""
    header, _ = ef.read_safetensors_header(path)
    header.pop("__metadata__", None)
    return header


def header_entries(header: dict) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, torch dtype, shape) of each tensor of a read_header() dict."""
    return [(n, ef.SAFETENSORS_DTYPES.get(e["dtype"], torch.uint8), tuple(e["shape"])) for n, e in header.items()]


def weight_bytes(entries, compute_dtype: torch.dtype) -> int:
    """Resident bytes of a rank's tensors, given as (name, torch dtype, shape): float tensors other than
    quantization scales in the compute dtype, the rest as stored. An embedding table left mapped is read a row a
    token, but where the page cache holds the file in huge pages each row maps 2 MB: a few hundred tokens bring
    in most of it, so it is counted whole."""
    compute = torch.empty((), dtype=compute_dtype).element_size()
    total = 0
    for name, dtype, shape in entries:
        is_weight = dtype.is_floating_point and not name.endswith(ef.QUANT_SUFFIXES)
        total += torch.Size(shape).numel() * (compute if is_weight else torch.empty((), dtype=dtype).element_size())
    return total


def rank_file_weight_bytes(path: str, compute_dtype: torch.dtype) -> int:
    return weight_bytes(header_entries(read_header(path)), compute_dtype)


def kv_cache_blocks(cfg: ef.EngineConfig, max_batch_size: int, max_seq_len: int, dtype: torch.dtype,
                    block_size: int = kv_cache.DEFAULT_BLOCK_SIZE, memory: int | None = None) -> int:
    """The block count tp-run's ranks agree on: the smallest any rank's budget holds."""
    return min(kv_cache.blocks_for(cfg, r, block_size, dtype, max_batch_size, max_seq_len, memory)
               for r in range(cfg.tp_size))


def kv_cache_bytes(cfg: ef.EngineConfig, rank: int, max_batch_size: int, max_seq_len: int, dtype: torch.dtype,
                   block_size: int = kv_cache.DEFAULT_BLOCK_SIZE, memory: int | None = None) -> int:
    """The KV pool of `rank` (runtime/kv_cache.py): its blocks, every layer's keys and values."""
    blocks = kv_cache_blocks(cfg, max_batch_size, max_seq_len, dtype, block_size, memory)
    return blocks * kv_cache.block_bytes(cfg, rank, block_size, dtype)


def check_fits(need: list[tuple[int, int, int]], available: int, max_batch_size: int, max_seq_len: int,
               dtype: torch.dtype, where: str = "this host", budget: bool = False) -> None:
    """Refuse, naming the flags that size the cache, when this host's ranks would not fit its memory.

    need: (weights, kv_cache, runtime) bytes of each rank on this host; available: the host's available
    memory before any of them loaded (memory.available(); 0: unknown, nothing is checked). budget: the cache
    was sized by --kv_cache_memory (then that is the flag to lower)."""
    if available <= 0:
        return
    total = sum(sum(n) for n in need)
    if total <= available:
        return
    weights, kv, runtime = (sum(n[k] for n in need) for k in range(3))
    kv_per_token = kv / max(1, max_batch_size * max_seq_len)
    room = available - weights - runtime
    fit_seq = int(room / max(1.0, kv_per_token * max_batch_size))
    fit_batch = int(room / max(1.0, kv_per_token * max_seq_len))
    dt = str(dtype).removeprefix("torch.")
    sized = "--kv_cache_memory" if budget else f"--max_batch_size {max_batch_size} x --max_seq_len {max_seq_len}"
    what = (f"{len(need)} rank(s) on {where} need {total / GiB:.1f} GiB: weights {weights / GiB:.1f} GiB + KV "
            f"cache {kv / GiB:.1f} GiB ({dt}, {sized}) "
            f"+ runtime {runtime / GiB:.1f} GiB, but {available / GiB:.1f} GiB is available")
    if room <= kv_per_token * 2 or (budget and room <= 0):
        raise UserError(f"{what}: the weights alone do not fit; quantize them (tp-convert --use_weight_only "
                        f"--weight_only_precision int4) or spread the ranks over more hosts")
    if budget:
        raise UserError(f"{what}; lower --kv_cache_memory (about {room / len(need) / GiB:.2f} GiB per rank fits)")
    hints = []
    if fit_seq >= 2:
        hints.append(f"--max_seq_len {fit_seq} fits at --max_batch_size {max_batch_size}")
    if fit_batch >= 1:
        hints.append(f"--max_batch_size {fit_batch} fits at --max_seq_len {max_seq_len}")
    raise UserError(f"{what}; lower --max_batch_size or --max_seq_len" + (f" ({'; '.join(hints)})" if hints else ""))
