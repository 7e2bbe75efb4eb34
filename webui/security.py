"""Where uploads go and how big they may be: one place for the policy that app.py applies to Gradio
(its `max_file_size` and its upload folder), so the limit and the folder are not scattered."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20     # evaluation / calibration texts; models never come in by upload


def uploads_dir(data_dir: Path) -> Path:
    """Uploads live under the user data folder, not in a /tmp/gradio shared with other users."""
    return Path(data_dir) / "uploads"
