"""A GPTQ checkpoint evaluated through its dequantized weights on the transformers engine.

This is the reference every GPTQ kernel must agree with (GPTQ_FORMAT.md: "the same logits as our own
dequantized weights"), and it lets the quantizer measure quality without a GPU kernel."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from backends.base import BackendError
from backends.gptq import format as gptq_format
from backends.transformers_backend import TransformersBackend


def dequantized_state(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(HF config dict without quantization_config, state dict with every linear dequantized)."""
    import json
    folder = Path(folder)
    qc = gptq_format.read_quantize_config(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    files = gptq_format.find_weight_files(folder, qc)
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                raw[key] = fh.get_tensor(key)
    state = {}
    fmt = None
    for key in [k for k in raw if k.endswith(".qweight")]:
        base = key[: -len(".qweight")]
        if fmt is None:
            fmt, _warning = gptq_format.resolve_checkpoint_format(qc, raw[f"{base}.qzeros"])
        W = gptq_format.dequantize(raw.pop(key), raw.pop(f"{base}.qzeros"), raw.pop(f"{base}.scales"),
                                   raw.pop(f"{base}.g_idx", None), qc.bits, fmt, group_size=qc.group_size)
        state[f"{base}.weight"] = W.T.contiguous().to(dtype)
    for key, value in raw.items():
        state[key] = value.to(dtype) if value.is_floating_point() else value
    return config, state


class DequantizedGPTQBackend(TransformersBackend):
    """Loads a GPTQ checkpoint as a float model (fp32 on CPU by default)."""
    name = "dequantized"

    def _build_model(self, path: Path, options: dict):
        from transformers import AutoConfig, AutoModelForCausalLM
        config_dict, state = dequantized_state(path, self._resolve_dtype(options))
        model_type = config_dict.get("model_type")
        config = AutoConfig.for_model(model_type, **{k: v for k, v in config_dict.items() if k != "model_type"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self._resolve_dtype(options))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise BackendError(f"{path.name}: checkpoint tensors do not match the model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if config.tie_word_embeddings:
            model.tie_weights()
        for name, module in list(model.named_modules()):  # rotary tables are buffers, not in the checkpoint
            if type(module).__name__.endswith("RotaryEmbedding"):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, type(module)(config=config))
        for name, buf in list(model.named_buffers()):  # non-persistent buffers (rotary) are still on meta
            if buf.device.type == "meta":
                raise BackendError(f"{path.name}: buffer {name} was not initialised")
        return model.to(self.device)
