"""A Ray Serve deployment wrapping a tp_runtime engine: one replica drives a RayEngine, whose ranks are Ray actors
in their own placement group; concurrent HTTP requests are grouped by @serve.batch into one generate() call.

    pip install 'tp_runtime[ray]' 'ray[serve]'
    serve run launch.ray_serve:build_app engine=engines/smollm2-135m-tp2 [placement=pack]   # from the repo root
    python launch/ray_serve.py --engine engines/smollm2-135m-tp2 [--port 8000] [--smoke]     # local cluster, same app
    curl -s localhost:8000/ -d '{"prompt": "When did the first world war end?", "max_tokens": 32}'
        -> {"text": ..., "output_ids": [...], "finish_reason": "length" | "stop"}

Request fields: prompt (string; the chat template is applied when the tokenizer has one), max_tokens, temperature,
top_p, top_k, repetition_penalty, seed, stop (list of strings), ignore_eos. A bad request gets HTTP 400 with a one-line message.
Requests batched together share one generate(): a request the engine refuses (a prompt beyond max_seq_len)
fails the requests batched with it, so the checks below refuse what they can before batching.
For the OpenAI-compatible server with continuous batching, use tp-serve instead; this is the Ray Serve recipe.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tp_runtime import RayEngine, SamplingParams
from tp_runtime.errors import UserError

FIELDS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float,
          "seed": int, "ignore_eos": bool}


def sampling_from_body(body: dict) -> SamplingParams:
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        raise UserError('the body needs a non-empty "prompt" string')
    kw = {}
    for name, kind in FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, bool) if kind is bool else number and (kind is float or float(value).is_integer())):
            raise UserError(f'"{name}" must be a{"n" if kind is int else ""} {kind.__name__}, got {value!r}')
        kw[name] = kind(value)
    stop = body.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise UserError('"stop" must be a list of strings')
    params = SamplingParams(stop=stop, **kw)
    params.validate()
    return params


# The replica only drives: it takes no CPU from the ranks' bundles. The rank actors and their placement group
# belong to the replica and go with it.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class TPEngine:
    def __init__(self, engine_dir: str, placement: str = "pack", threads: int | None = None):
        self.engine = RayEngine(engine_dir, placement=placement, threads=threads)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, items: list[tuple[str, SamplingParams]]) -> list[dict]:
        prompts, params = [p for p, _ in items], [s for _, s in items]
        # generate() blocks while the ranks work: run it off the replica's event loop
        outs = await asyncio.to_thread(self.engine.generate, prompts, params, chat_template=None)
        return [{"text": o.text, "output_ids": o.output_ids, "finish_reason": o.finish_reason} for o in outs]

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise UserError("the body must be a JSON object")
            params = sampling_from_body(body)
            return JSONResponse(await self.generate((body["prompt"], params)))
        except (UserError, ValueError) as e:  # ValueError: bad JSON
            return JSONResponse({"error": str(e).splitlines()[0]}, status_code=400)


def build_app(args: dict):
    """Application builder for `serve run launch.ray_serve:build_app engine=DIR [placement=pack] [threads=N]`."""
    threads = int(args["threads"]) if args.get("threads") else None
    return TPEngine.bind(args["engine"], args.get("placement", "pack"), threads)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def smoke(url: str) -> None:
    """One request alone, then three at once (batched together by Serve): greedy answers must not change."""
    prompts = ["When did the first world war end?", "Name three colours.", "What is 2 + 2?"]
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in prompts]
    status, alone = post(url, bodies[0])
    print(status, alone)
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda b: post(url, b), bodies))
    for status, answer in together:
        print(status, answer["text"])
    print("alone == batched:", together[0][1] == alone)
    print(*post(url, {"prompt": "", "max_tokens": 5}))
    print(*post(url, {"prompt": "Hi", "max_tokens": 1.5}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Serve an engine with Ray Serve on a new local Ray cluster.")
    p.add_argument("--engine", required=True)
    p.add_argument("--placement", default="pack", choices=["pack", "spread"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--smoke", action="store_true", help="send a few requests, print the answers, and stop")
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        t = time.perf_counter()
        serve.run(TPEngine.bind(os.path.abspath(args.engine), args.placement, args.threads), route_prefix="/")
        print(f"[ray_serve] ready in {time.perf_counter() - t:.1f}s on http://{args.host}:{args.port}/",
              file=sys.stderr, flush=True)
        if not args.smoke:
            while True:
                time.sleep(3600)
        smoke(f"http://{args.host}:{args.port}/")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
