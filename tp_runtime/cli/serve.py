"""tp-serve: an OpenAI-compatible HTTP server over an engine, with continuous batching.

    tp-serve --engine ENGINE [--host 127.0.0.1] [--port 8000] [--api_key KEY] [--max_batch_size B]
             [--launcher auto|local|mpirun|torchrun|ray] [runtime flags of tp-run]

Rank 0 runs the scheduler (engine_loop.py) on its main thread and serves HTTP (server.py) on a second
thread; the other ranks follow its steps. Who starts the ranks:
    this process is already a rank (mpirun, torchrun, a Ray actor: launcher variables are set)
                    -> serve as that rank
    --launcher local, or auto with tp_size > 1 -> start tp_size rank processes here (local_launch.py)
    --launcher ray  -> tp_runtime.distributed.ray_cluster.launch_ranks runs main(argv) in one actor per rank
    tp_size 1       -> serve in this process
`main(argv)` is the rank entry point: it works wherever the torchrun-style variables are set.
Shutdown: SIGINT / SIGTERM on rank 0 stops the HTTP server, ends the running requests and broadcasts
STOP, so every rank exits cleanly; a follower ignores its first SIGINT / SIGTERM (rank 0 stops it).
A lost rank (or host): the failed collective ends the engine loop; in-flight requests get 503, the HTTP server
answers 503 for FAILED_DRAIN_S more, and every surviving rank exits with status 3 and one line naming the lost
ranks, so a supervisor restarts the server.
"""

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading

from tp_runtime.engine import format as ef
from tp_runtime import env
from tp_runtime.errors import CommError, UserError, exit_on_user_error
from tp_runtime.distributed.launch import detect_launch
from tp_runtime.cli.run import add_ray_args, add_runtime_args, llm_from_args

API_KEY_ENV = "TP_RUNTIME_API_KEY"
FAILED_DRAIN_S = 2.0  # after the engine fails: 503s (not refused connections) before the process exits
LAUNCHERS = ("auto", "local", "mpirun", "torchrun", "ray")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tp-serve", description="Serve an engine over OpenAI-compatible HTTP.")
    p.add_argument("--engine", "--engine_dir", dest="engine", required=True, help="engine directory")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer to use (default: the engine's)")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this host only)")
    h.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    h.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    h.add_argument("--served_model_name", default=None, help="the model name of the API (default: the engine folder's)")
    h.add_argument("--max_body_bytes", type=int, default=1 << 20,
                   help="request body limit in bytes, 413 beyond it (default %(default)s = 1 MiB)")
    h.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default %(default)s)")
    h.add_argument("--access_log", action="store_true", help="log every HTTP request")
    h.add_argument("--max_queue", type=int, default=None,
                   help="requests waiting to run past which new ones get 429 with Retry-After (default: no limit)")
    p.add_argument("--launcher", default="auto", choices=LAUNCHERS,
                   help="who starts the ranks: auto = the launcher that started this process, else local when "
                        "the engine's tp_size > 1; local: tp_size rank processes started here; mpirun / torchrun: "
                        "expect to be started by them; ray: one Ray actor per rank (default %(default)s)")
    add_ray_args(p)
    add_runtime_args(p)
    return p


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_body_bytes < 1024:
        raise UserError(f"--max_body_bytes must be >= 1024, got {args.max_body_bytes}")
    info = detect_launch()
    if info.launcher == "none":
        tp_size = args.tp_size or ef.EngineConfig.load(args.engine).tp_size  # --tp_size: re-sliced at load
        if args.launcher == "ray":  # this process drives; the ranks run this main in Ray actors
            from tp_runtime.runtime.ray_engine import launch_console_script

            print(f"[tp-serve] starting {tp_size} ranks as Ray actors", file=sys.stderr, flush=True)
            return launch_console_script(main, argv, args.engine, args.device, args.threads, args.placement,
                                         args.ray_address, args.tp_size)
        if args.launcher in ("mpirun", "torchrun") and tp_size > 1:
            raise UserError(f"--launcher {args.launcher}: start tp-serve under it, e.g. "
                            + (f"mpirun -n {tp_size} tp-serve ..." if args.launcher == "mpirun"
                               else f"torchrun --nproc_per_node {tp_size} $(which tp-serve) ..."))
        if tp_size > 1:
            from tp_runtime.distributed.local_launch import launch_local

            print(f"[tp-serve] starting {tp_size} local ranks", file=sys.stderr, flush=True)
            return launch_local(tp_size, [sys.executable, "-m", "tp_runtime.cli.serve", *argv])
    return serve_rank(args)


def serve_rank(args) -> int:
    llm = llm_from_args(args)
    if llm.rank != 0:
        return _follow(llm)
    from tp_runtime.runtime.engine_loop import Scheduler

    lock = threading.Lock()
    tokenizer = llm.tokenizer  # a clear error now rather than at the first request

    def decode(ids):
        with lock:
            return tokenizer.decode(ids, skip_special_tokens=True)

    eos = llm.eos_ids
    scheduler = Scheduler(llm.model, llm.cache, llm.comm, llm.device, eos, decode, blocks=llm.blocks,
                          max_num_tokens=llm.options.max_num_tokens, streaming=llm.streaming)
    try:
        sock = _listen(args.host, args.port)
    except UserError:
        scheduler.shutdown()
        llm.close()
        raise
    api_key = args.api_key or env.api_key()
    name = args.served_model_name or os.path.basename(os.path.normpath(args.engine))
    return _serve(llm, scheduler, tokenizer, lock, sock, args, api_key, name)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def _serve(llm, scheduler, tokenizer, lock, sock, args, api_key, name) -> int:
    """The engine loop runs on the main thread (torch runs its parallel regions ~1.7x slower from another
    thread here); uvicorn runs on a second thread. SIGINT / SIGTERM end the HTTP server (its in-flight
    requests get a few seconds), and its end stops the engine loop."""
    import uvicorn

    from tp_runtime.serve.server import ServerState, create_app

    stop = threading.Event()
    failure = []

    def engine_down():
        if failure:
            return f"the engine failed: {failure[0]}"
        return "the server is shutting down" if stop.is_set() or scheduler.stopped else None

    state = ServerState(scheduler, tokenizer, name, llm.max_seq_len, api_key, args.max_body_bytes, lock,
                        llm.generation_config, engine_down=engine_down, max_queue=args.max_queue)
    config = uvicorn.Config(create_app(state), log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _Server(config)

    def http():
        try:
            server.run(sockets=[sock])
        finally:
            stop.set()

    def on_signal(sig, frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    old = _handle_signals(on_signal)
    http_thread = threading.Thread(target=http, name="tp-serve-http", daemon=True)
    http_thread.start()
    host, port = sock.getsockname()[:2]
    print(f"[tp-serve] serving {name!r} at http://{host}:{port}/v1 (tp_size={llm.config.tp_size}, device="
          f"{llm.device}, comm={llm.comm.backend}, max_batch_size={llm.max_batch_size}, "
          f"max_seq_len={llm.max_seq_len}{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    try:
        scheduler.run(stop)
    except CommError as e:  # a rank or its host is lost: no request can be served any more
        failure.append(e)
        stop.wait(FAILED_DRAIN_S)  # the in-flight requests' 503s go out; new ones get 503 too
    finally:
        server.should_exit = True
        http_thread.join(timeout=30)
        for s, h in old.items():
            signal.signal(s, h)
        if not failure:
            llm.close()  # (a broken process group is left to the exit: its teardown could wait on the lost)
    if failure:
        raise failure[0]  # one line, exit status 3 (errors.exit_on_user_error)
    print("[tp-serve] stopped", file=sys.stderr, flush=True)
    return 0


def _handle_signals(handler) -> dict:
    """SIGINT/SIGTERM -> handler; returns the old handlers. Not on a thread other than the main one (a rank
    in a Ray actor): there the driver ends the actors, and Python refuses handlers anyway."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


class _Server:
    """uvicorn.Server on a thread of its own: the main thread handles the signals (uvicorn would only
    install its handlers on the main thread, and re-raise the signal once it has shut down)."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)


def _follow(llm) -> int:
    from tp_runtime.runtime.engine_loop import follow

    signals = []

    def on_signal(sig, frame):
        signals.append(sig)
        if len(signals) > 1:  # a second one: leave now
            raise KeyboardInterrupt

    _handle_signals(on_signal)
    follow(llm.model, llm.cache, llm.comm, llm.device)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
