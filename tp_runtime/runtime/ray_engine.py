"""An engine's ranks as Ray actors, driven from one process.

    engine = RayEngine("ENGINE", placement="pack")           # a local cluster, or address="auto" for a running one
    outs = engine.generate(prompts, SamplingParams(...))       # rank 0's list of RequestOutput, as LLM.generate
    engine.shutdown()

Every rank builds tp_runtime.LLM inside its actor (ray_cluster.RankGroup) and keeps its weights loaded between
calls; generate() runs LLM.generate on every rank in lockstep and returns what rank 0 produced.
`launch_console_script` is the `--launcher ray` of the console scripts (tp-run): the driver starts the actors and
each runs the script's main as one rank.
"""

import sys

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError
from tp_runtime.distributed.launch import detect_launch
from tp_runtime.distributed.ray_cluster import DEFAULT_PLACEMENT_TIMEOUT_S, RankGroup, launch_ranks


def _use_gpu(device: str) -> bool | None:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    return {"auto": None, "cpu": False, "cuda": True}[device]


class RayEngine:
    """tp_runtime.LLM on a Ray placement group: one actor per rank, rank 0's results returned to the driver.

    placement: pack (every rank on one node) or spread (across nodes); address: the Ray cluster (None: Ray's
    rule, a new local cluster when none runs; "auto": a running one). threads: CPUs (and torch threads) per
    rank, default an even share of a node. Other keyword arguments go to LLM: options=RuntimeOptions(...) and
    single settings (max_batch_size, max_seq_len, dtype, comm, comm_timeout_s, bind, reserve_cores, ...)."""

    def __init__(self, engine_dir: str, placement: str = "pack", address: str | None = None, device: str = "auto",
                 threads: int | None = None, placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S, **llm_kwargs):
        self.config = ef.EngineConfig.load(engine_dir)
        ef.check_rank_files(engine_dir, self.config.tp_size)
        self.engine_dir = engine_dir
        options = llm_kwargs.get("options")
        # tp_size (a keyword or options'): that many ranks, the engine re-sliced at load (runtime/reslice.py)
        self.ranks = (llm_kwargs.get("tp_size") or (options.tp_size if options is not None else None)
                      or self.config.tp_size)
        self.group = RankGroup(self.ranks, placement, address, _use_gpu(device), threads,
                               placement_timeout_s)
        try:
            self.group.start(_build_llm, engine_dir, device=device, threads=threads, **llm_kwargs)
        except BaseException:
            self.group.shutdown()
            raise
        self.load_s = self.group.attr("load_s")
        self.last_timings = None

    @property
    def tp_size(self) -> int:
        return self.ranks

    def generate(self, prompts, sampling_params=None, chat_template: bool | None = False,
                 max_input_length: int | None = None):
        """As LLM.generate (without streaming): one RequestOutput per prompt, from rank 0."""
        with self.group.lock:  # safe to call from several threads: the calls queue up
            results = self.group.call("generate", prompts, sampling_params, chat_template=chat_template,
                                      max_input_length=max_input_length)
            self.last_timings = self.group.attr("last_timings")
        return results[0]

    def shutdown(self) -> None:
        """Stop the actors and release their placement group (and the local cluster this engine started)."""
        self.group.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _build_llm(engine_dir, **kwargs):
    from tp_runtime.runtime.llm import LLM

    return LLM(engine_dir, **kwargs)


def launch_console_script(main, argv: list[str], engine_dir: str, device: str = "auto", threads: int | None = None,
                          placement: str = "pack", address: str | None = None, tp_size: int | None = None) -> int:
    """Run a console script's main(argv) on tp_size Ray actors (None: the engine's; argv with `--launcher auto`
    appended, so the ranks run it as under torchrun); rank 0's output is printed here. Returns rank 0's exit
    status."""
    if detect_launch().world_size > 1:
        raise UserError("--launcher ray starts the ranks itself: run the command once, not under mpirun or torchrun")
    cfg = ef.EngineConfig.load(engine_dir)
    ef.check_rank_files(engine_dir, cfg.tp_size)
    results = launch_ranks(tp_size or cfg.tp_size, main, [*argv, "--launcher", "auto"], placement=placement,
                           address=address, use_gpu=_use_gpu(device), cpus_per_rank=threads)
    sys.stdout.flush()
    return results[0] or 0
