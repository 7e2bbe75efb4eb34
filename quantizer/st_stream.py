"""Write a safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory and serialises them into one more buffer,
which would double the peak RAM of writing a checkpoint; here the header is computed from shapes and
each tensor is fetched, written and dropped in turn."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPE_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
               torch.bool: "BOOL"}
CODE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}

Entry = tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]  # name, dtype code, shape, fetch


def write(path: Path, entries: Iterable[Entry], metadata: dict | None = None) -> int:
    """Write `entries` in order to `path` (via a temp file and rename); return the file size."""
    entries = list(entries)
    header, offset = {}, 0
    for name, code, shape, _ in entries:
        n = CODE_SIZES[code]
        for d in shape:
            n *= int(d)
        header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, code, shape, fetch in entries:
            t = fetch().detach().to("cpu").contiguous()
            if DTYPE_CODES.get(t.dtype) != code or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: expected {code} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    os.replace(tmp, path)
    return 8 + len(raw) + offset
