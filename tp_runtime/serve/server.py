"""The HTTP side of tp-serve (rank 0): FastAPI routes, server-sent events, API key, metrics.

Routes: POST /v1/completions, POST /v1/chat/completions (stream true: `data: {...}` events, then
`data: [DONE]`), GET /v1/models, GET /health (no key), GET /metrics (Prometheus text format).
The engine loop (engine_loop.Scheduler) runs on another thread; a request hands it a ServeRequest whose
events come back to the request's asyncio queue. A request whose client goes away is cancelled, which
frees its cache slot at the next step. Every error answers in OpenAI's shape
{"error": {"message", "type", "param", "code"}}. Once the engine has stopped or failed (a rank or its host lost),
in-flight requests end with a 503 (a streaming one with an error event, then [DONE]), and new ones, and /health,
get 503 until the process exits.
"""

import asyncio
import hmac
import json
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tp_runtime.serve import openai_protocol as api
from tp_runtime.runtime.engine_loop import Event, Scheduler, ServeRequest
from tp_runtime.runtime.sequence import Request as EngineRequest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
DISCONNECT_POLL_S = 0.5


class Metrics:
    def __init__(self, scheduler: Scheduler):
        self.registry = r = CollectorRegistry()
        self.http = Counter("tp_serve_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=r)
        self.requests = Counter("tp_serve_requests", "generation requests finished, by finish reason",
                                ["kind", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("tp_serve_prompt_tokens", "prompt tokens of the generation requests", registry=r)
        self.generated_tokens = Counter("tp_serve_generation_tokens", "tokens generated", registry=r)
        Gauge("tp_serve_queue_length", "requests waiting to run (new or preempted)", registry=r).set_function(
            lambda: scheduler.queue_length)
        Gauge("tp_serve_running_batch_size", "requests in the running batch", registry=r).set_function(
            lambda: scheduler.batch_size)
        blocks = scheduler.blocks
        Gauge("tp_serve_kv_blocks_in_use", "KV-cache blocks held by running requests", registry=r).set_function(
            lambda: blocks.in_use)
        Gauge("tp_serve_kv_blocks_free", "KV-cache blocks free or holding an unused cached prefix",
              registry=r).set_function(lambda: blocks.available)
        Gauge("tp_serve_prefix_cache_hit_rate", "prompt tokens taken from the prefix cache / prompt tokens admitted",
              registry=r).set_function(lambda: blocks.hit_rate)
        Gauge("tp_serve_preemptions", "requests preempted when the KV cache ran out (recomputed later)",
              registry=r).set_function(lambda: scheduler.preemptions)
        self.ttft = Histogram("tp_serve_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("tp_serve_inter_token_latency_seconds", "time between two tokens of a request",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.steps = Counter("tp_serve_engine_steps", "engine steps by kind (prefill, decode)", ["kind"], registry=r)
        self.step_rows = Counter("tp_serve_engine_step_rows", "rows summed over the engine steps (rows / steps: the "
                                 "mean batch)", ["kind"], registry=r)
        self.step_time = Histogram("tp_serve_engine_step_seconds", "duration of one engine step (forward + sampling)",
                                   ["kind"], registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("tp_serve_request_duration_seconds", "arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS)


    def on_step(self, kind: str, rows: int, seconds: float) -> None:
        """The scheduler's step hook (engine thread)."""
        self.steps.labels(kind).inc()
        self.step_rows.labels(kind).inc(rows)
        self.step_time.labels(kind).observe(seconds)


class ServerState:
    """What the routes need: the scheduler, the tokenizer (behind a lock: the engine thread decodes with
    it too), the limits, the key."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, max_seq_len: int, api_key: str | None,
                 max_body_bytes: int, tokenizer_lock: threading.Lock, generation_config: dict | None = None,
                 engine_down=lambda: None, max_queue: int | None = None):
        """engine_down() -> None while the engine runs, else why it stopped (then every route answers 503)."""
        self.scheduler, self.tokenizer, self.lock = scheduler, tokenizer, tokenizer_lock
        self.generation_config = generation_config or {}
        self.limits = api.Limits(model_name, max_seq_len)
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.engine_down = engine_down
        self.max_queue = max_queue  # requests waiting to run past which new ones get 429
        self.metrics = Metrics(scheduler)
        scheduler.on_step = self.metrics.on_step

    def encode(self, text: str) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text)["input_ids"])

    def apply_template(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise api.ApiError(400, "this engine's tokenizer has no chat template; use /v1/completions")
        try:
            with self.lock:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return list(tok(text, add_special_tokens=False)["input_ids"])
        except Exception as e:  # the template's own checks (roles, order) raise jinja errors
            raise api.ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None

    def token_text(self, token: int) -> str:
        with self.lock:
            return self.tokenizer.decode([token])


DRAIN_FACTOR = 16  # an oversized body up to 16x the limit is read and dropped before the 413


def error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _discard_rest(request: Request, budget: int) -> None:
    """Read and drop what is left of an oversized body (up to `budget` bytes), so the client, still sending,
    reads the 413 instead of a connection reset (a socket closed with unread data sends RST)."""
    async for part in request.stream():
        budget -= len(part)
        if budget < 0:
            return


async def read_json(request: Request, limit: int) -> dict:
    drain = DRAIN_FACTOR * limit
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        if int(length) <= drain:
            await _discard_rest(request, drain)
        raise api.ApiError(413, f"the request body has {length} bytes, more than the limit of {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            await _discard_rest(request, drain - len(body))
            raise api.ApiError(413, f"the request body is larger than the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise api.ApiError(400, "the request body must be a JSON object")
    return data


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tp-serve", docs_url=None, redoc_url=None, openapi_url=None)
    m = state.metrics

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if state.api_key is not None and path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                response = error_response(api.ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                                       code="invalid_api_key"))
                m.http.labels(path if path in KNOWN_ROUTES else "other", "401").inc()
                return response
        response = await call_next(request)
        m.http.labels(path if path in KNOWN_ROUTES else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(api.ApiError)
    async def on_api_error(request, e: api.ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(api.ApiError(e.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def on_bug(request, e: Exception):
        return error_response(api.ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health():
        down = state.engine_down()
        if down is not None:
            return JSONResponse({"status": "engine stopped", "reason": down}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.limits.model, "object": "model", "created": 0,
                                            "owned_by": "tp_runtime", "max_model_len": state.limits.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, state.max_body_bytes)
        job = await run_in_threadpool(api.parse_completion, body, state.limits, state.encode)
        return await generate(request, job)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, state.max_body_bytes)
        job = await run_in_threadpool(api.parse_chat, body, state.limits, state.apply_template)
        return await generate(request, job)

    async def generate(request: Request, job: api.Job):
        down = state.engine_down()
        if down is not None:
            raise api.ApiError(503, f"the engine is unavailable: {down}", type="server_error")
        waiting = state.scheduler.queue_length
        if state.max_queue is not None and waiting >= state.max_queue:
            raise api.ApiError(429, f"the server is busy: {waiting} requests are waiting (--max_queue "
                               f"{state.max_queue}); retry later", type="rate_limit_error",
                               headers={"Retry-After": "1"})
        if any(not 0 <= t < state.scheduler.vocab_size for t in job.prompt_ids):
            raise api.ApiError(400, f"the prompt has token ids outside the vocabulary [0, {state.scheduler.vocab_size})",
                               param="prompt")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = ServeRequest(EngineRequest(job.prompt_ids, job.params.resolved(state.generation_config)),
                           lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), top_logprobs=job.top_logprobs)
        m.prompt_tokens.inc(len(job.prompt_ids))
        tracker = _Tracker(req, m)
        state.scheduler.submit(req)
        if job.stream:
            return StreamingResponse(stream(request, job, req, events, tracker), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, ids, lps, tops = "", [], [], []
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    state.scheduler.cancel(req)
                    tracker.finish(job.kind, "cancelled")
                    return Response(status_code=499)
                continue
            tracker.see(ev)
            text += ev.text
            ids += ev.token_ids
            lps += ev.logprobs
            tops += ev.top_logprobs
            if ev.finish_reason:
                break
        tracker.finish(job.kind, ev.finish_reason)
        if ev.error:
            raise _event_error(ev)
        block = api.logprobs_block(job, ids, lps, tops, state.token_text)
        return api.response(job, state.limits.model, text, ev.finish_reason, block, len(ids))

    async def stream(request: Request, job: api.Job, req: ServeRequest, events: asyncio.Queue, tracker):
        model, n_out, reason = state.limits.model, 0, None
        try:
            if job.kind == "chat":
                yield _sse(api.chunk(job, model, "", None, None, first=True))
            while True:
                ev = await events.get()
                tracker.see(ev)
                n_out += len(ev.token_ids)
                if ev.error:
                    reason = ev.finish_reason
                    yield _sse(_event_error(ev).body())
                    break
                block = api.logprobs_block(job, ev.token_ids, ev.logprobs, ev.top_logprobs, state.token_text)
                if ev.text or block:
                    yield _sse(api.chunk(job, model, ev.text, None, block))
                if ev.finish_reason:
                    reason = ev.finish_reason
                    yield _sse(api.chunk(job, model, None, ev.finish_reason, None))
                    break
            if job.include_usage:
                yield _sse(api.chunk(job, model, None, None, None, usage_block=api.usage(len(job.prompt_ids), n_out)))
            yield "data: [DONE]\n\n"
        finally:
            if reason is None:  # the client went away (the response task was cancelled)
                state.scheduler.cancel(req)
                reason = "cancelled"
            tracker.finish(job.kind, reason)

    return app


KNOWN_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def _event_error(ev: Event) -> api.ApiError:
    """A request's error event as the API's error: 500 when it failed alone, 503 when the engine stopped."""
    if ev.status == 503:
        return api.ApiError(503, f"the engine is unavailable: {ev.error}", type="server_error")
    return api.ApiError(500, f"generation failed: {ev.error}", type="server_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Tracker:
    """Feeds one request's latencies and token counts into the metrics."""

    def __init__(self, req: ServeRequest, m: Metrics):
        self.req, self.m, self.last, self.done = req, m, None, False

    def see(self, ev: Event) -> None:
        n = len(ev.token_ids)
        if not n:
            return
        self.m.generated_tokens.inc(n)
        if self.last is None:
            self.m.ttft.observe(ev.time - self.req.arrival)
        else:
            for _ in range(n):
                self.m.itl.observe((ev.time - self.last) / n)
        self.last = ev.time

    def finish(self, kind: str, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.m.requests.labels(kind, reason or "unknown").inc()
        if self.last is not None:
            self.m.e2e.observe(self.last - self.req.arrival)
