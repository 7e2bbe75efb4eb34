"""What an engine tells about a load (Backend.load_warnings) reaches the Models tab's status line."""
from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import save_file

from backends.gptq import format as fmt
from backends.gptq import rtn
from webui.context import AppContext
from webui.models_tab import ModelsTab


def test_load_status_shows_the_engines_notes(tmp_path, default_hf_model):
    models = tmp_path / "models"
    folder = rtn.quantize_folder(default_hf_model, models / "smol-mislabeled", bits=4, group_size=128)
    # zeros stored in the v2 form while the config says v1: the loader notices and says so
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file({k: fmt.convert_qzeros(v, 4, "gptq", "gptq_v2") if k.endswith(".qzeros") else v
               for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    assert json.loads((folder / "quantize_config.json").read_text()).get("checkpoint_format", "gptq") == "gptq"
    ctx = AppContext.create(models_dir=models, data_dir=tmp_path / "data")
    tab = ModelsTab(ctx)
    try:
        status, *_ = tab.load("smol-mislabeled", "gptq")
        assert status.startswith("Loaded **smol-mislabeled@gptq**"), status
        assert "\n\nNote: " in status and "gptq_v2" in status
        model_id = ctx.manager.loaded_ids()[0]
        assert list(ctx.manager.get(model_id).backend.load_warnings) == [status.split("Note: ", 1)[1]]
    finally:
        ctx.manager.unload_all()
