"""The converter's orchestrator: a Hugging Face checkpoint -> an engine directory with one file per rank.

    read (checkpoint.py, prequantized.py, gguf.py) -> adapt (adapters/) -> plan (plan.py)
      -> calibrate (awq.py for AWQ, smoothquant.py for SmoothQuant) -> quantize + partition (shard.py)
      -> write (writer.py)

Each stage is a module this one calls; none calls back. Memory stays bounded: one canonical tensor (q, k
and v together for attention) is in memory at a time, plus one rank's slice of it. The engine is built in
a temporary sibling directory and renamed into place at the end, so an interrupted conversion never
leaves an engine that loads. The command line (tp-convert) is cli/convert.py.
"""

import dataclasses
import os
import shutil
import sys
import tempfile

from tp_runtime.convert import awq, gguf, smoothquant
from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.checkpoint import open_checkpoint
from tp_runtime.convert.plan import plan_engine
from tp_runtime.convert.prequantized import open_prequantized
from tp_runtime.convert.shard import prepare_tensor, rank_tensors
from tp_runtime.convert.writer import StreamingSafetensorsWriter, copy_tokenizer
from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError


def convert(
    model_dir: str,
    output_dir: str,
    tp_size: int = 1,
    dtype: str = "auto",
    force: bool = False,
    max_seq_len: int | None = None,
    max_batch_size: int = 8,
    progress: bool = True,
    parallel_embedding: bool = False,
    quant=None,
    calib_file: str | None = None,
    calib_samples: int = 32,
    calib_seq_len: int = 256,
    awq_clip: bool = True,
) -> ef.EngineConfig:
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not force:
        raise UserError(f"output directory {output_dir} exists; pass --force to replace it")
    ckpt, prequant = open_prequantized(open_checkpoint(model_dir))
    model_name = os.path.basename(os.path.normpath(model_dir))
    if prequant is not None:
        if quant is not None:
            raise UserError(f"{model_dir} is already quantized ({prequant.quant_algo}, group {prequant.group_size}); "
                            "convert it without --use_weight_only")
        quant = prequant
    ckpt, quant = gguf.keep_blocks(ckpt, quant)
    if quant is not None and quant.algo == "awq" and not quant.prequantized and quant.awq is None:
        # plan first: a flag or group-size mistake is reported before the calibration run
        plan_engine(ckpt, tp_size, dtype, model_name, max_seq_len, max_batch_size, parallel_embedding, quant)
        quant = dataclasses.replace(quant, awq=search_awq(ckpt, quant, calib_file, calib_samples, calib_seq_len,
                                                          progress, awq_clip))
    if quant is not None and quant.algo == "sq" and quant.sq_steps is None:
        quant = search_smoothquant(ckpt, quant, calib_file, calib_samples, calib_seq_len, progress,
                                   lambda q: plan_engine(ckpt, tp_size, dtype, model_name, max_seq_len,
                                                         max_batch_size, parallel_embedding, q))
    plan = plan_engine(ckpt, tp_size, dtype, model_name, max_seq_len, max_batch_size, parallel_embedding, quant)
    cfg, plans, tensors, specs, out_dtype = plan.config, plan.plans, plan.tensors, plan.specs, plan.out_dtype
    head_dim = cfg.head_size

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        writers = [StreamingSafetensorsWriter(os.path.join(tmp, ef.rank_file(r)), specs[r],
                                              {"format": "pt", "rank": r, "tp_size": tp_size})
                   for r in range(tp_size)]
        bar = _progress(len(tensors), progress, "converting")
        for ct in tensors:
            full = prepare_tensor(ct, ct.load(False), quant)
            for p in plans:
                for name, s in rank_tensors(ct, full, p, head_dim, out_dtype):
                    writers[p.rank].write(name, s)
                del s
            del full
            bar.update(1)
        bar.close()
        for w in writers:
            w.close()
        copy_tokenizer(ckpt, tmp, getattr(plan.adapter, "tokenizer_overrides", None))
        cfg.save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; an engine is an ordinary directory
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def search_awq(ckpt, quant, calib_file, calib_samples: int, calib_seq_len: int, progress: bool,
               clip: bool = True):
    adapter = get_adapter(ckpt)
    fields = adapter.config()
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    return awq.search(ckpt, tensors, fields, quant, calib_file, calib_samples, calib_seq_len, progress, clip)


def search_smoothquant(ckpt, quant, calib_file, calib_samples: int, calib_seq_len: int, progress: bool, check):
    """quant with SmoothQuant's linears left weight-only, smoothing transforms and static steps; check(quant)
    plans the engine first, so a flag mistake is reported before the calibration run."""
    adapter = get_adapter(ckpt)
    fields = adapter.config()
    names, line = smoothquant.weight_only_modules(fields)
    quant = dataclasses.replace(quant, sq_weight_only=tuple(names))
    check(quant)
    if line:
        print(line, file=sys.stderr)
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    res, steps = smoothquant.search(ckpt, tensors, fields, quant.sq_alpha, calib_file, calib_samples, calib_seq_len,
                                    progress)
    return dataclasses.replace(quant, awq=res, sq_steps=steps)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)
