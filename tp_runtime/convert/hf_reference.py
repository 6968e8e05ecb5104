"""The transformers side of tp-eval: the same model run by AutoModelForCausalLM, for comparison.

It runs on rank 0 after the engine has closed (so no collective waits on it), on every core the job
was started with (the engine's binding is undone), with as many torch threads as those cores.
"""

import os
import time

import torch

from tp_runtime.errors import UserError


def load_model(hf_dir: str, dtype: str = "float32", cores: tuple[int, ...] | None = None):
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf_model_dir {hf_dir} is not a directory")
    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"transformers cannot load {hf_dir} ({str(e).strip().splitlines()[0]})") from None
    return model.eval()


@torch.inference_mode()
def window_nll(model, ids: list[int], windows) -> tuple[float, int]:
    """(sum of negative log-likelihoods, tokens scored) over the windows, the guide's way: labels of the
    already-scored tokens are -100, the model's mean loss times the number of labels it averaged."""
    total, count = 0.0, 0
    for begin, end, start in windows:
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :start] = -100
        n = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
        loss = model(input_ids, labels=labels).loss
        total += float(loss) * n
        count += n
    return total, count


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int,
             batch_size: int = 1) -> tuple[list[list[int]], float]:
    """Greedy continuations of token-id prompts (left-padded batches), each cut before its first EOS;
    and the seconds spent in model.generate."""
    outs, seconds = [], 0.0
    eos = sorted(eos_ids) or None
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        T = max(len(p) for p in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        t0 = time.perf_counter()
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                             eos_token_id=eos, pad_token_id=pad_id)
        seconds += time.perf_counter() - t0
        for row in seq[:, T:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            outs.append(row[:cut])
    return outs, seconds
