"""Sampling presets: shipped YAML files in `presets/` (read-only) plus the user's own saved in the
data folder, so an update of the code never clobbers what the user made and the reverse."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from backends.base import BackendError, SamplingParams

log = logging.getLogger(__name__)

# The fields a preset holds, in display order; the sampling knobs of SamplingParams minus `stop`.
PRESET_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,47}$")


def check_preset_name(name: str) -> str:
    """A preset name doubles as a file name: letters, digits, space, `_ . -`, no path parts."""
    name = (name or "").strip()
    if not _NAME_RE.match(name) or ".." in name or name.endswith("."):
        raise ValueError(f"Preset name {name!r} is not allowed: use 1-48 letters, digits, spaces, "
                         "'_', '-' or '.', starting with a letter or digit.")
    return name


def preset_values(values: dict) -> dict:
    """Keep the preset fields, coerce their types and check their ranges (ValueError when wrong)."""
    missing = [f for f in PRESET_FIELDS if f not in values]
    if missing:
        raise ValueError(f"preset is missing {', '.join(missing)}")
    clean = {f: values[f] for f in PRESET_FIELDS}
    try:
        params = SamplingParams.from_dict(clean).validated()
    except (BackendError, TypeError, ValueError) as exc:
        raise ValueError(f"preset values are invalid: {exc}") from None
    out = {f: getattr(params, f) for f in PRESET_FIELDS}
    out["seed"] = -1 if params.seed is None else params.seed
    return out


class PresetStore:
    """Shipped presets from `shipped_dir`, user presets in `user_dir`; user names cannot shadow
    shipped ones."""

    def __init__(self, shipped_dir: Path, user_dir: Path):
        self.shipped_dir = Path(shipped_dir)
        self.user_dir = Path(user_dir)

    def _files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in (self.shipped_dir, self.user_dir):  # shipped first: they win on a clash
            if folder.is_dir():
                for path in sorted(folder.glob("*.yaml")):
                    found.setdefault(path.stem.lower(), path)
        return found

    def names(self) -> list[str]:
        """Shipped presets first (Deterministic leading), then the user's, alphabetically."""
        shipped, user = [], []
        for path in self._files().values():
            (shipped if path.parent == self.shipped_dir else user).append(path.stem)
        order = {"Deterministic": 0, "Balanced": 1, "Creative": 2, "Precise": 3}
        shipped.sort(key=lambda n: (order.get(n, 99), n.lower()))
        return shipped + sorted(user, key=str.lower)

    def is_shipped(self, name: str) -> bool:
        path = self._files().get(name.lower())
        return path is not None and path.parent == self.shipped_dir

    def get(self, name: str) -> dict:
        path = self._files().get((name or "").lower())
        if path is None:
            raise ValueError(f"no preset named {name!r}; known: {', '.join(self.names())}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as exc:
            raise ValueError(f"preset file {path.name} cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"preset file {path.name} is not a mapping of values")
        return preset_values(data)

    def save_new(self, name: str, values: dict) -> Path:
        """Write a new preset to the user folder; refuses an existing name (shipped or user)."""
        name = check_preset_name(name)
        clean = preset_values(values)
        if name.lower() in self._files():
            raise ValueError(f"a preset named {name!r} already exists: pick another name")
        self.user_dir.mkdir(parents=True, exist_ok=True)
        target = self.user_dir / f"{name}.yaml"
        partial = target.with_suffix(".yaml.partial")
        partial.write_text(yaml.safe_dump(clean, sort_keys=False), encoding="utf-8")
        partial.replace(target)
        return target
