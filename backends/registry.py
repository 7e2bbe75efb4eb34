"""Maps backend names to classes (imported lazily: torch-heavy engines load only when used) and
detects which backend a model path needs."""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from backends.base import Backend, BackendError

# name -> "module:Class". One line per engine.
_BACKENDS = {
    "transformers": "backends.transformers_backend:TransformersBackend",
    "llama.cpp": "backends.llamacpp_backend:LlamaCppBackend",
    "bitsandbytes": "backends.bitsandbytes_backend:BitsAndBytesBackend",
    "gptq": "backends.gptq.backend:GPTQBackend",
}

# format -> backends that can load it, preferred first
_FORMAT_BACKENDS = {
    "gguf": ("llama.cpp",),
    "gptq": ("gptq",),
    "hf": ("transformers", "bitsandbytes"),
}


def backend_names() -> list[str]:
    """Names of the engines whose module is present in this install."""
    names = []
    for name, target in _BACKENDS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def backend_class(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    module_name, class_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not available: {exc}") from None
    return getattr(module, class_name)


def create_backend(name: str) -> Backend:
    return backend_class(name)()


def read_model_config(folder: Path) -> dict:
    """A model folder's config.json as a dict; a BackendError naming the folder when it is not valid
    JSON or not an object (the caller checks that the file exists: what a missing one means differs)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackendError(f"{folder.name}/config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BackendError(f"{folder.name}/config.json is not a JSON object")
    return config


def _is_gptq_config(config: dict) -> bool:
    qc = config.get("quantization_config") or {}
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq"


def detect_format(path: Path) -> str:
    """"gguf", "gptq" or "hf"; BackendError with the reason when `path` is not a model."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise BackendError(f"{path.name} is not a model: expected a .gguf file or a model folder")
    if not path.is_dir():
        raise BackendError(f"{path.name}: no such model file or folder")
    if (path / "quantize_config.json").exists() or (path / "quant_config.json").exists():
        return "gptq"
    if (path / "config.json").exists():
        config = read_model_config(path)
        if _is_gptq_config(config):
            return "gptq"
        if not any(path.glob("*.safetensors")):
            raise BackendError(f"{path.name} has a config.json but no .safetensors weights "
                               "(pickle .bin/.pt weights are not loaded)")
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise BackendError(f"{path.name} is a folder of GGUF files: pick the file itself ({ggufs[0].name})")
    raise BackendError(f"{path.name} is not a model: no config.json, quantize_config.json or .gguf inside")


def default_backend_for(path: Path) -> str:
    return _FORMAT_BACKENDS[detect_format(path)][0]


def backends_for_format(fmt: str) -> tuple[str, ...]:
    return _FORMAT_BACKENDS.get(fmt, ())
