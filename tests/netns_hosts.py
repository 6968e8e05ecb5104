"""Hosts on one machine for the multi-host tests: launch/netns_hosts.sh brings up network namespaces tphost0..,
each with its own address, hostname, /etc/hosts, /dev/shm and Ray session folder, and launch/netns-rsh runs a
command in one of them as ssh would. Only root with CAP_SYS_ADMIN and iproute2 can build them: unavailable()
says why not, and the tests skip with that reason."""

import os
import shlex
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "netns_hosts.sh")
RSH = os.path.join(REPO, "launch", "netns-rsh")
NET = "10.231.0"


def unavailable() -> str | None:
    """None when this machine can build the hosts, else the reason it cannot."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "the multi-host rig needs root (CAP_SYS_ADMIN) to create network namespaces"
    missing = [t for t in ("ip", "unshare", "nsenter") if shutil.which(t) is None]
    if missing:
        return f"the multi-host rig needs {', '.join(missing)} (iproute2, util-linux)"
    probe = f"tpprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` failed here ({res.stderr.strip() or res.returncode}): no multi-host rig"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """n hosts, tphost0 .. tphost{n-1} at 10.231.0.1 ..; rank 0's host is names[0]."""

    def __init__(self, n: int):
        self.names = [f"tphost{k}" for k in range(n)]
        self.addrs = [f"{NET}.{k + 1}" for k in range(n)]

    def up(self) -> None:
        subprocess.run(["bash", SCRIPT, "down"], capture_output=True)  # a rig left by a killed run
        res = subprocess.run(["bash", SCRIPT, "up", str(len(self.names))], capture_output=True, text=True)
        if res.returncode != 0:
            self.down()
            raise RuntimeError(f"netns_hosts.sh up failed:\n{res.stdout}{res.stderr}")

    def down(self) -> None:
        subprocess.run(["bash", SCRIPT, "down"], capture_output=True, timeout=120)

    def env(self, **extra) -> dict:
        """The environment of commands in the hosts: this checkout first on the path, eager decoding, one
        thread per rank (2 cores are shared by every rank of every host)."""
        env = dict(os.environ, OMP_NUM_THREADS="1", TP_RUNTIME_COMPILE="off", RAY_USAGE_STATS_ENABLED="0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", "")))
        for k in [k for k in env if k.startswith(("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "HYDRA_"))]:
            env.pop(k)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
            env.pop(k, None)
        env.update(extra)
        return env

    def command(self, host: str, argv: list[str]) -> list[str]:
        """argv run in `host`, through netns-rsh (the words are quoted for its shell, as for ssh)."""
        return [RSH, host, shlex.join(argv)]

    def popen(self, host: str, argv: list[str], env: dict) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def run(self, host: str, argv: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), env=env, capture_output=True, text=True, timeout=timeout)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; all of them are killed if one outlives the timeout."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    return outs
