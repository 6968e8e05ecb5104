"""OpenAI's completion and chat-completion request and response shapes, without HTTP.

parse_*() check a decoded JSON body and turn it into a Job (prompt ids, SamplingParams, options), or
raise ApiError with OpenAI's error fields; *_response() and *_chunk() build the answers. The server
(server.py) owns the HTTP side.

Sampling values the request leaves out come from the engine's generation_config.json, as in tp-run;
temperature 0 is greedy. Extensions beyond OpenAI's fields: top_k, repetition_penalty, ignore_eos.
"""

import time
import uuid
from dataclasses import dataclass, field

from tp_runtime.errors import UserError
from tp_runtime.runtime.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    model: str  # the served model name
    max_seq_len: int  # prompt + output tokens of one request


@dataclass
class Job:
    kind: str  # "completion" | "chat"
    prompt_ids: list[int]
    params: SamplingParams  # unresolved: the engine's defaults fill what is left out
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# --- field checks ---

def _get(body: dict, name: str, kinds, default=None, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", bool: "a boolean", str: "a string",
                             list: "a list", dict: "an object"}[k] for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _refuse(body: dict, name: str, unsupported, why: str) -> None:
    if name in body and body[name] not in (None, *unsupported):
        raise ApiError(400, f"'{name}' is not supported by this server ({why})", param=name)


def check_model(body: dict, limits: Limits) -> None:
    name = _get(body, "model", (str,))
    if name is not None and name != limits.model:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{limits.model}`",
                       param="model", code="model_not_found")


def _sampling(body: dict, max_tokens_names: tuple[str, ...]) -> tuple[SamplingParams, int | None]:
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    _refuse(body, "best_of", (1,), "one sequence per request")
    _refuse(body, "logit_bias", ({},), "logit_bias is not implemented")
    _refuse(body, "echo", (False,), "echo is not implemented")
    _refuse(body, "suffix", ("",), "suffix is not implemented")
    _refuse(body, "tools", ([],), "no tool calling")
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _get(body, name, (int,), max_tokens, lo=1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    top_k = _get(body, "top_k", (int,), None, lo=-1)
    params = SamplingParams(
        temperature=_get(body, "temperature", (int, float), None, lo=0, hi=2),
        top_p=_get(body, "top_p", (int, float), None, lo=0, hi=1),
        top_k=0 if top_k == -1 else top_k,
        repetition_penalty=_get(body, "repetition_penalty", (int, float), None),
        presence_penalty=float(_get(body, "presence_penalty", (int, float), 0.0, lo=-2, hi=2)),
        frequency_penalty=float(_get(body, "frequency_penalty", (int, float), 0.0, lo=-2, hi=2)),
        seed=_get(body, "seed", (int,), None, lo=-(2**63), hi=2**64 - 1),
        stop=stop,
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
    )
    if params.top_p == 0:
        raise ApiError(400, "'top_p' must be in (0, 1], got 0", param="top_p")
    try:
        params.validate()
    except UserError as e:
        raise ApiError(400, str(e)) from None
    return params, max_tokens


def _fit(job: Job, max_tokens: int | None, default: int | None, limits: Limits) -> Job:
    """Check the prompt and max_tokens against the KV cache: prompt + max_tokens <= max_seq_len."""
    n, S = len(job.prompt_ids), limits.max_seq_len
    if n == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if n >= S:
        raise ApiError(400, f"the prompt has {n} tokens; this engine takes at most {S - 1} prompt tokens "
                            f"(max_seq_len {S}, prompt and output together)", param="prompt",
                       code="context_length_exceeded")
    room = S - n
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {n} tokens exceed the engine's max_seq_len "
                            f"{S}; ask for at most {room}", param="max_tokens", code="context_length_exceeded")
    job.params.max_tokens = max_tokens if max_tokens is not None else min(default or room, room)
    return job


def _stream(body: dict, job: Job) -> None:
    job.stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), None)
    if options is not None:
        if not job.stream:
            raise ApiError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
        job.include_usage = bool(options.get("include_usage", False))


# --- requests ---

def parse_completion(body: dict, limits: Limits, encode) -> Job:
    """encode(text) -> ids (the tokenizer, no chat template)."""
    check_model(body, limits)
    params, max_tokens = _sampling(body, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request: send the prompts as separate requests", param="prompt")
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")
    job = Job("completion", ids, params)
    _stream(body, job)
    lp = _get(body, "logprobs", (int,), None, lo=0, hi=MAX_TOP_LOGPROBS)
    job.logprobs, job.top_logprobs = lp is not None, lp or 0
    return _fit(job, max_tokens, 16, limits)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: dict, limits: Limits, apply_template) -> Job:
    """apply_template(messages) -> ids (the tokenizer's chat template, with the generation prompt)."""
    check_model(body, limits)
    params, max_tokens = _sampling(body, ("max_tokens", "max_completion_tokens"))
    ids = apply_template(parse_messages(body))
    job = Job("chat", ids, params)
    _stream(body, job)
    job.logprobs = _get(body, "logprobs", (bool,), False)
    job.top_logprobs = _get(body, "top_logprobs", (int,), 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if job.top_logprobs and not job.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return _fit(job, max_tokens, None, limits)


# --- responses ---

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_block(job: Job, ids, lps, tops, token_text) -> dict | None:
    """OpenAI's logprobs object for these tokens; token_text(id) -> str."""
    if not job.logprobs:
        return None
    if job.kind == "chat":
        def entry(t, lp):
            s = token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in (top or [])]}
                            for t, lp, top in zip(ids, lps, tops or [None] * len(ids))]}
    return {"tokens": [token_text(t) for t in ids], "token_logprobs": list(lps),
            "top_logprobs": [{token_text(a): b for a, b in top} for top in tops] if tops else None}


def response(job: Job, model: str, text: str, finish_reason: str, logprobs: dict | None, n_out: int) -> dict:
    base = {"id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id, "created": job.created, "model": model,
            "usage": usage(len(job.prompt_ids), n_out)}
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return {**base, "object": "chat.completion", "choices": [choice]}
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**base, "object": "text_completion", "choices": [choice]}


def chunk(job: Job, model: str, text: str | None, finish_reason: str | None, logprobs: dict | None,
          first: bool = False, usage_block: dict | None = None) -> dict:
    """One server-sent event's object; text None and usage_block given: the final usage chunk."""
    base = {"id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id, "created": job.created, "model": model}
    if job.kind == "chat":
        base["object"] = "chat.completion.chunk"
        delta = {} if text is None and not first else {"content": text or ""}
        if first:
            delta["role"] = "assistant"
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    else:
        base["object"] = "text_completion"
        choices = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
    if usage_block is not None:
        return {**base, "choices": [], "usage": usage_block}
    return {**base, "choices": choices}
