"""Small guards for input that comes from users: file names, paths that must stay inside a folder,
and uploads (size-limited, stored under the app's data folder, never half-written)."""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import BinaryIO

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\- ]{0,127}$")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_name(name: str, what: str = "name") -> str:
    """A single path component a user may choose (a preset, an upload, a model folder): letters,
    digits, '.', '_', '-', '+', spaces; no separators, no leading dot, no '..', at most 128 chars."""
    if not isinstance(name, str):
        raise ValueError(f"the {what} must be text")
    clean = unicodedata.normalize("NFC", name).strip()
    if not clean:
        raise ValueError(f"the {what} is empty")
    if ".." in clean or "/" in clean or "\\" in clean or "\x00" in clean:
        raise ValueError(f"the {what} {clean[:60]!r} may not contain '/', '\\' or '..'")
    if not _NAME_RE.match(clean):
        raise ValueError(f"the {what} {clean[:60]!r} may only use letters, digits, spaces and . _ - + "
                         "(not starting with a dot), at most 128 characters")
    if clean.split(".")[0].lower() in _RESERVED:
        raise ValueError(f"the {what} {clean!r} is a reserved device name")
    return clean


def confined(base: Path, relative: str | os.PathLike, what: str = "path") -> Path:
    """`base / relative` resolved (symlinks followed); ValueError when it leaves `base`."""
    base = Path(base).resolve()
    raw = str(relative)
    if "\x00" in raw:
        raise ValueError(f"the {what} contains a NUL byte")
    candidate = Path(raw)
    if candidate.is_absolute():
        raise ValueError(f"the {what} {raw[:80]!r} must be relative to {base}")
    resolved = (base / candidate).resolve()
    if resolved == base or base not in resolved.parents:
        raise ValueError(f"the {what} {raw[:80]!r} is outside {base}")
    return resolved


class UploadTooLarge(ValueError):
    pass


def store_upload(source: BinaryIO | str | os.PathLike, uploads_dir: Path, name: str,
                 max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> Path:
    """Copy an upload into `uploads_dir/<safe name>` in chunks, refusing it past `max_bytes`.
    Written to a `.partial` file and renamed when complete, so a refused or broken upload leaves
    nothing behind. Returns the stored path."""
    name = safe_name(name, "file name")
    uploads_dir = Path(uploads_dir)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    target = confined(uploads_dir, name, "file name")
    if isinstance(source, (str, os.PathLike)):
        size = Path(source).stat().st_size
        if size > max_bytes:
            raise UploadTooLarge(f"{name} is {size / 2**20:.1f} MiB; uploads are limited to "
                                 f"{max_bytes / 2**20:.1f} MiB")
        with open(source, "rb") as handle:
            return store_upload(handle, uploads_dir, name, max_bytes)
    partial = target.with_name(target.name + ".partial")
    written = 0
    try:
        with open(partial, "wb") as out:
            while True:
                block = source.read(1 << 20)
                if not block:
                    break
                written += len(block)
                if written > max_bytes:
                    raise UploadTooLarge(f"{name} is larger than the upload limit of "
                                         f"{max_bytes / 2**20:.1f} MiB")
                out.write(block)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target

