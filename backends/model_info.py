"""How a model's weights are stored, in a few words for the Models table ("4-bit g128, act-order",
"Q4_1", "bfloat16"): read from its config files or a GGUF file's header only, so listing the models
folder never reads weights. Anything unreadable gives "" (the status column says what is wrong)."""
from __future__ import annotations

import struct
from pathlib import Path

from backends.base import BackendError
from backends.registry import read_model_config

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def describe(path: Path, fmt: str | None) -> str:
    reader = {"gptq": gptq_summary, "gguf": gguf_summary, "hf": hf_summary}.get(fmt or "")
    if reader is None:
        return ""
    try:
        return reader(Path(path))
    except (BackendError, OSError, ValueError, KeyError, TypeError, OverflowError, struct.error, RecursionError):
        return ""


def gptq_summary(folder: Path) -> str:
    from backends.gptq.format import FormatError, read_quantize_config
    try:
        config = read_quantize_config(folder)
    except FormatError:
        return ""
    parts = [f"{config.bits}-bit " + ("per-column" if config.group_size == -1 else f"g{config.group_size}")]
    if config.desc_act:
        parts.append("act-order")
    elif config.meta.get("act_order") is True and config.static_groups:
        parts.append("act-order, static groups")   # ours: g_idx stays plain, so desc_act is false
    if not config.sym:
        parts.append("asym")
    return ", ".join(parts)


def hf_summary(folder: Path) -> str:
    """The stored dtype, or another tool's quantization method (awq, bitsandbytes...)."""
    config = read_model_config(folder)
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method"):
        return str(quantization["quant_method"])
    dtype = config.get("torch_dtype") or config.get("dtype")
    return str(dtype) if isinstance(dtype, str) else ""


def gguf_summary(file: Path) -> str:
    """general.file_type of the header (Q4_K_M, Q8_0, F16...), named as llama.cpp names it."""
    from gguf import LlamaFileType
    value = _gguf_header_value(file, "general.file_type")
    if not isinstance(value, int):
        return ""
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {value}"


def _gguf_header_value(file: Path, wanted: str):
    """One key of a little-endian GGUF (v2/v3) header, reading past the others (arrays included)."""
    with open(file, "rb") as fh:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = fh.read(size)
            if len(data) != size:
                raise ValueError("the GGUF header ends early")
            return struct.unpack(fmt, data)[0]

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                fh.seek(read("<Q"), 1)
            elif kind == _GGUF_ARRAY:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    fh.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _GGUF_SCALARS:
                fh.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        if fh.read(4) != b"GGUF" or read("<I") not in (2, 3):
            return None
        read("<Q")                                   # tensor count
        for _ in range(read("<Q")):                  # key-value count
            length = read("<Q")
            if length > 65536:
                raise ValueError("a GGUF key longer than 64 KiB")
            key = fh.read(length).decode("utf-8", errors="replace")
            kind = read("<I")
            if key == wanted and kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            skip(kind)
    return None
