"""Fixtures of the quantizer tests: a models folder holding a truncated copy of the real default model
(its first decoder layers, same weights, tokenizer and config otherwise), so the job, resume and UI
tests exercise the real pipeline in seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def truncate_model(source: Path, dest: Path, layers: int) -> Path:
    """Copy `source` keeping only its first `layers` decoder layers."""
    dest.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    with safe_open(str(source / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            if key.startswith("model.layers."):
                if int(key.split(".")[2]) >= layers:
                    continue
            tensors[key] = fh.get_tensor(key)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory, default_hf_model) -> Path:
    """A models folder with `tiny` (2 layers of the default model) and `tiny4` (4 layers)."""
    root = tmp_path_factory.mktemp("models")
    truncate_model(default_hf_model, root / "tiny", 2)
    truncate_model(default_hf_model, root / "tiny4", 4)
    return root
