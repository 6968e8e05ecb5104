"""Test helpers: tiny random checkpoints built with transformers' own classes, and rank launchers."""

import json
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    """A console script of this environment (tp-run, tp-convert, mpirun, torchrun)."""
    path = os.path.join(BIN, name)
    assert os.path.exists(path), f"{name} is not installed in {BIN}"
    return path


from tp_runtime.distributed.launch import free_port  # noqa: E402,F401  (the tests' ports too)


def build_checkpoint(path: str, arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random model saved with save_pretrained; returns the transformers model (fp32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kw = dict(vocab_size=103, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # random, non-trivial norms so a norm bug cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(path)
    return model.float()


def build_outlier_checkpoint(path: str):
    """A tiny Llama with activation outliers, as real LLMs have (a few large norm channels), and a char tokenizer
    for calibration text (AWQ, SmoothQuant). Returns the transformers model."""
    model = build_checkpoint(path, "llama", intermediate_size=128)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 20
            layer.post_attention_layernorm.weight[[5, 22]] *= 20
    model.save_pretrained(path)
    save_char_tokenizer(path)
    return model


def save_char_tokenizer(path):
    """A character-level tokenizer (ids 3..97) for a tiny checkpoint: AWQ reads calibration text."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.printable[:95])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return vocab


def run_ranks(n: int, args: list[str], launcher: str = "env", timeout: float = 300, env_extra=None):
    """Run `args` (argv of a Python console script or module) as n ranks. Returns CompletedProcess.

    launcher: env (torchrun-style variables set here, one subprocess per rank), mpirun, torchrun.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    for k in [k for k in env if k.startswith(("OMPI_", "PMI_", "MPI_LOCAL"))] + ["RANK", "WORLD_SIZE"]:
        env.pop(k, None)
    if launcher == "mpirun":
        return subprocess.run([tool("mpirun"), "-n", str(n), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    if launcher == "torchrun":
        return subprocess.run([tool("torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port()),
                               *args], env=env, capture_output=True, text=True, timeout=timeout)
    if n == 1:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    port = str(free_port())
    procs = []
    for r in range(n):
        e = dict(env, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    rc = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(args, rc, "".join(o[0] for o in outs), "".join(o[1] for o in outs))


def cli_in_process(main, argv: list[str], capsys) -> tuple[int, str]:
    """A console script's main(argv) run in this process: (exit status, stderr). A user error is its one line
    and status 2 as from the command (exit_on_user_error); anything else escapes and fails the test."""
    try:
        rc = main(argv) or 0
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def tp_run_json(engine: str, n: int, extra: list[str], launcher: str = "env", **kw) -> dict:
    """Run tp-run on n ranks with --output_json and return the parsed JSON."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    res = run_ranks(n, [tool("tp-run"), "--engine", engine, "--output_json", out, *extra], launcher, **kw)
    assert res.returncode == 0, f"tp-run failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    return data


def reference_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """Log-probs of `output` after `prompt` under a transformers model, in one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards (no KV cache): independent of any cache logic."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def reference_incremental(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy ids and their log-probs from transformers' own cached generate (one prompt, no padding).
    Needed where a full forward differs from incremental decoding (dynamic NTK RoPE)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids, strict=True)]
    return ids, lps


def random_prompts(vocab: int, seed: int, lengths=(3, 11, 7, 16)) -> list[list[int]]:
    """Different prompts of different lengths, one per batch row."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def in_process_outputs(engine: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """tp-run --output_json's "outputs" for a tp=1 engine, from LLM in this process (eager, unbound)."""
    from tp_runtime import LLM, SamplingParams

    llm = LLM(engine, compile="off", bind="none")
    try:
        res = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    finally:
        llm.close()
    return {"outputs": [{"input_ids": r.input_ids, "output_ids": r.output_ids, "output_logprobs": r.output_logprobs,
                         "finish_reason": r.finish_reason} for r in res]}


def assert_engine_matches(model, engine: str, tp: int, prompts: list[list[int]], new_tokens: int = 8,
                          incremental: bool = False, label: str = ""):
    """The engine at tp ranks gives transformers' greedy ids and log-probs (within 1e-3) on every row. tp > 1 runs
    tp-run's ranks; tp=1 runs the same runtime in this process (tp-run's own path is tested in test_cli and
    test_real_model), which spares a process start per check."""
    if tp == 1:
        out = in_process_outputs(engine, prompts, new_tokens)
    else:
        out = tp_run_json(engine, tp, ["--input_ids", *(",".join(map(str, p)) for p in prompts),
                                       "--max_output_len", str(new_tokens), "--ignore_eos"])
    for row, (p, o) in enumerate(zip(prompts, out["outputs"], strict=True)):
        assert o["input_ids"] == p
        if incremental:
            ids, ref = reference_incremental(model, p, new_tokens)
        else:
            ids, ref = reference_greedy(model, p, new_tokens), None
        assert o["output_ids"] == ids, f"{label} tp={tp} row {row}"
        if ref is None:
            ref = reference_logprobs(model, p, o["output_ids"])
        diff = max(abs(a - b) for a, b in zip(ref, o["output_logprobs"], strict=True))
        assert diff < 1e-3, f"{label} tp={tp} row {row}: log-probs differ by {diff}"
