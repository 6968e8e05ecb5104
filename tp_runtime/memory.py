"""Memory as the kernel counts it: this process's resident set by kind, the machine's available memory, and
a sampler of the peak while something runs. Linux /proc and cgroup files; elsewhere the readers return 0.

    anonymous  RssAnon + RssShmem: memory only this process's pages hold (heap, tensors it allocated,
               shared memory segments). The kernel cannot drop it without swap: it is what must fit.
    mapped     RssFile: file pages mapped and touched (an mmap'd rank file); clean, so the kernel can drop
               them under pressure and read them again.

No torch import here.
"""

import ctypes
import os
import re
import threading
import time

from tp_runtime.errors import UserError



def _status() -> dict:
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def process() -> dict:
    """{"anonymous", "mapped", "rss", "peak_rss"} bytes of this process now (peak_rss: VmHWM, both kinds)."""
    s = _status()
    return {"anonymous": s.get("RssAnon", 0) + s.get("RssShmem", 0), "mapped": s.get("RssFile", 0),
            "rss": s.get("VmRSS", 0), "peak_rss": s.get("VmHWM", 0)}


def anonymous() -> int:
    return process()["anonymous"]


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, v1 limit_in_bytes), None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def _cgroup_usage() -> int:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return 0


def available() -> int:
    """Bytes this process may still allocate on this host: MemAvailable (free memory plus the page cache the
    kernel can drop), capped by the cgroup's limit less its usage where a container sets one. 0: unknown."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return 0
    limit = _cgroup_limit()
    if limit is not None:
        avail = min(avail, max(0, limit - _cgroup_usage()))
    return avail


class PeakSampler:
    """Samples this process's anonymous memory every `interval` s on a thread while a `with` block runs:
    `.peak` is the largest seen (the kernel keeps no high-water mark of anonymous memory alone).

        with PeakSampler() as s:
            load()
        print(s.peak)
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.peak = anonymous()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous())
        return False


MADV_DONTNEED = 4


def release_file_pages(path: str) -> int:
    """Drop the pages of `path` that this process has mapped and touched from its resident set (madvise
    MADV_DONTNEED on each of its mappings); tensors that still map them read them back from the page cache
    when they next touch them, the others' pages stay out. For a loader that copied tensors out of a mapped file:
    the copies' sources stop counting. A mapping that holds pages written since it was made (copies on write,
    which DONTNEED would throw away) is left as it is. Returns the bytes released (0 off Linux)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/smaps") as f:
            text = f.read().splitlines()
    except OSError:
        return 0
    spans, cur = [], None
    for line in text:
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            cur = None
            if len(head) == 6 and os.path.realpath(head[5].strip()) == real:
                start, end = (int(v, 16) for v in head[0].split("-"))
                cur = {"start": start, "end": end, "Rss": 0, "Anonymous": 0}
                spans.append(cur)
        elif cur is not None and head and head[0].rstrip(":") in cur:
            cur[head[0].rstrip(":")] = int(head[1]) * 1024
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    released = 0
    for s in spans:
        if s["Anonymous"] or not s["Rss"]:  # Anonymous: copies on write (Private_Dirty counts the page cache's too)
            continue
        if libc.madvise(ctypes.c_void_p(s["start"]), ctypes.c_size_t(s["end"] - s["start"]), MADV_DONTNEED) == 0:
            released += s["Rss"]
    return released


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc malloc_trim): a loader's freed transient buffers
    otherwise stay in this process's anonymous memory. Nothing where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pid_anonymous(pid: int) -> int:
    """Another process's anonymous bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        if line.startswith(("RssAnon:", "RssShmem:")):
            total += int(line.split()[1]) * 1024
    return total


def parse_size(text: str, flag: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*", str(text).lower())
    if not m:
        raise UserError(f"{flag} {text!r} is not a size such as 24GiB, 80GB or 1073741824")
    units = {None: 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    return int(float(m.group(1)) * units[m.group(2)])
