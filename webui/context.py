"""The application context handed to every tab: the one place that holds what would otherwise be
module-level globals (the model manager, the user's data folder, the stores on top of it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.manager import ModelManager
from webui.history import HistoryStore
from webui.presets import PresetStore

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PRESETS = REPO / "presets"
DEFAULT_MODELS_DIR = REPO / "models"


def default_data_dir() -> Path:
    """User data lives outside the code, so a fresh clone or `git clean` never loses it."""
    env = os.environ.get("GPTQ_WEBUI_DATA")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "gptq-webui"


@dataclass
class AppContext:
    manager: ModelManager
    data_dir: Path
    presets: PresetStore
    history: HistoryStore
    default_backend: str | None = None   # --backend: used when the Models tab says "auto"
    blocks: Any = None                   # the gr.Blocks being built, for page-load events

    @classmethod
    def create(cls, models_dir: Path | None = None, data_dir: Path | None = None,
               default_backend: str | None = None, manager: ModelManager | None = None) -> "AppContext":
        data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(manager=manager or ModelManager(Path(models_dir or DEFAULT_MODELS_DIR)),
                   data_dir=data_dir,
                   presets=PresetStore(SHIPPED_PRESETS, data_dir / "presets"),
                   history=HistoryStore(data_dir / "history"),
                   default_backend=default_backend)

    @property
    def models_dir(self) -> Path:
        return self.manager.models_dir
