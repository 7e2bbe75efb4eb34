"""Decoder layers read one at a time from memory-mapped safetensors shards.

The supported architectures are listed as data: the decoder-layer and rotary classes of transformers,
and the linears of a block in true-sequential order, grouped by the input they share (q/k/v read the
same tensor, so they share one Hessian)."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from backends.base import BackendError
from backends.registry import read_model_config


@dataclass(frozen=True)
class Arch:
    module: str
    decoder_layer: str
    rotary: str
    # true-sequential order; the linears of one inner tuple read the same input
    sequential: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    # the block is h = x + o_proj(attention(norm(x))); y = h + mlp(post_norm(h)): true-sequential passes
    # may then start from a stored o_proj input or residual h instead of the layer input
    o_proj: str | None = "self_attn.o_proj"
    post_norm: str | None = "post_attention_layernorm"
    mlp: str | None = "mlp"


ARCHS = {
    "llama": Arch("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "mistral": Arch("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer", "MistralRotaryEmbedding"),
    "qwen2": Arch("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
}


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise BackendError(f"{Path(model_dir).name} has no config.json: not a Hugging Face model folder")
    config = read_model_config(Path(model_dir))
    if config.get("quantization_config"):
        raise BackendError(f"{Path(model_dir).name} is already quantized; quantize an fp16/bf16/fp32 model")
    return config


def arch_for(config: dict) -> Arch:
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in ARCHS:
        raise BackendError(f"architecture {model_type or '(none)'!r} is not supported by the quantizer yet; "
                           f"supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


class ShardReader:
    """Which shard holds which tensor; each read opens the shard memory-mapped and closes it again,
    so only the tensors asked for ever become resident."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        self.files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            for key, name in weight_map.items():
                path = model_dir / name
                if Path(name).name != name or not path.is_file():
                    raise BackendError(f"{index.name} names shard {name!r}, which is missing")
                self.files[key] = path
        else:
            shards = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
            for path in shards:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        self.files[key] = path
        if not self.files:
            raise BackendError(f"{model_dir.name} has no .safetensors weights (pickled .bin/.pt weights "
                               "are not read); convert it to safetensors first")

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.files[key]), framework="pt") as fh:
            return tuple(fh.get_slice(key).get_shape())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def read(self, keys: list[str], dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as fh:
                for name in names:
                    t = fh.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype or t.dtype).contiguous()
                    del t
        return out


class LayerFactory:
    """Builds decoder layer i on `device` with its weights from the shards, and the rotary embedding."""

    def __init__(self, model_dir: Path, config_dict: dict, reader: ShardReader):
        from transformers import AutoConfig
        self.arch = arch_for(config_dict)
        self.config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
        self.config._attn_implementation = "sdpa"  # attention_mask=None then means causal
        module = importlib.import_module(self.arch.module)
        self.layer_cls = getattr(module, self.arch.decoder_layer)
        self.rotary_cls = getattr(module, self.arch.rotary)
        self.reader = reader
        self.num_layers = int(self.config.num_hidden_layers)
        self.hidden = int(self.config.hidden_size)

    def prefix(self, i: int) -> str:
        return f"{self.arch.layers_prefix}.{i}."

    def layer_keys(self, i: int) -> list[str]:
        p = self.prefix(i)
        return [k for k in self.reader.keys() if k.startswith(p)]

    def build(self, i: int, dtype: torch.dtype, device) -> torch.nn.Module:
        with torch.device("meta"):
            layer = self.layer_cls(self.config, layer_idx=i)
        p = self.prefix(i)
        tensors = self.reader.read(self.layer_keys(i), dtype=dtype, device=device)
        state = {k[len(p):]: v for k, v in tensors.items()}
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise BackendError(f"layer {i}: weights do not match the architecture "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return layer.eval()

    def rotary(self, seqlen: int, dtype: torch.dtype, device):
        rot = self.rotary_cls(config=self.config).to(device)
        x = torch.zeros(1, seqlen, self.hidden, dtype=dtype, device=device)
        pos = torch.arange(seqlen, device=device).unsqueeze(0)
        return pos, rot(x, pos)

    def linear_names(self) -> list[str]:
        return [name for group in self.arch.sequential for name in group]


def run_layer(layer, x: torch.Tensor, pos, pe) -> torch.Tensor:
    out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out
