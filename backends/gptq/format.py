"""The one module that owns the on-disk GPTQ format (see ../shared/docs/GPTQ_FORMAT.md).

The quantizer writes checkpoints through it and the gptq backend reads them through it, so packing,
zero-point conventions (v1 stores z-1, v2 stores z), quantize configs and weight-file discovery are
defined exactly once. Nothing else in the project packs bits.

Bit layout: every bit width uses the same rule, a little-endian bit stream of 32-bit words in which
value j of a block starts at bit b*j. For 2/4/8 bits no value straddles a word; for 3 bits 32 values
fill exactly 3 words and values 10 and 21 straddle, which reproduces the layout GPTQ_FORMAT.md spells
out word by word.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from backends.base import BackendError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
CONFIG_FILES = ("quantize_config.json", "quant_config.json")


class FormatError(BackendError, ValueError):
    """A checkpoint or tensor that does not follow the GPTQ format; the text says what and where."""


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"GPTQ supports {', '.join(map(str, SUPPORTED_BITS))} bits, got {bits}")


def block_shape(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run of values that fills whole int32 words."""
    _check_bits(bits)
    return (32, 3) if bits == 3 else (32 // bits, 1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2^32) as int32 bit patterns."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack dim 0 of an integer [L, C] tensor into int32 words [L*bits/32, C]."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise FormatError(f"expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    values, nwords = block_shape(bits)
    length, cols = codes.shape
    if length % values:
        raise FormatError(f"{bits}-bit packing needs a multiple of {values} values along the packed "
                          f"dimension, got {length}")
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if lo < 0 or hi >= 2**bits:
            raise FormatError(f"codes out of range for {bits} bits: [{lo}, {hi}]")
    c = codes.to(torch.int64).reshape(length // values, values, cols)
    out = torch.zeros(length // values, nwords, cols, dtype=torch.int64, device=codes.device)
    for j in range(values):
        pos = bits * j
        word, shift = divmod(pos, 32)
        out[:, word] |= (c[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # straddles into the next word (3-bit values 10 and 21)
            out[:, word + 1] |= c[:, j] >> (32 - shift)
    return _to_int32(out.reshape(-1, cols))


def _unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of _pack_rows: int32 words [length*bits/32, C] -> int32 values [length, C]."""
    _check_bits(bits)
    values, nwords = block_shape(bits)
    if length % values or words.shape[0] * 32 != length * bits:
        raise FormatError(f"a {bits}-bit tensor of {words.shape[0]} words cannot hold {length} values")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(length // values, nwords, -1)
    mask = (1 << bits) - 1
    out = torch.empty(length // values, values, w.shape[-1], dtype=torch.int64, device=words.device)
    for j in range(values):
        pos = bits * j
        word, shift = divmod(pos, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        out[:, j] = v & mask
    return out.reshape(length, -1).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] in [0, 2^bits) -> qweight int32 [K*bits/32, N], packed along the input dim."""
    return _pack_rows(codes, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> codes int32 [K, N]."""
    return _unpack_rows(qweight, bits, K)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """True zero points [G, N] -> qzeros int32 [G, N*bits/32], packed along the output dim.

    v1 ("gptq") stores z-1, which cannot represent z = 0: such zeros are refused rather than
    silently overflowing into the neighbouring field (write asymmetric checkpoints as gptq_v2)."""
    _check_format(checkpoint_format)
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if z.numel() and int(z.min()) <= 0:
            raise FormatError("checkpoint_format 'gptq' (v1) cannot store a zero point of 0; "
                              "write this checkpoint as 'gptq_v2'")
        z = z - 1
    return _pack_rows(z.t().contiguous(), bits).t().contiguous()


def unpack_qzeros_raw(qzeros: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """The stored fields of qzeros [G, N*bits/32] -> int32 [G, N], without the v1 +1."""
    return _unpack_rows(qzeros.t().contiguous(), bits, N).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, N: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """qzeros -> true zero points int32 [G, N] (v1 adds 1 to each stored field, as every reader does)."""
    _check_format(checkpoint_format)
    raw = unpack_qzeros_raw(qzeros, bits, N)
    return raw + 1 if checkpoint_format == "gptq" else raw


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float32,
               group_size: int | None = None) -> torch.Tensor:
    """W[K, N] = scales[g] * (q - z[g]) with g = g_idx[k]: the weights a layer computes x @ W with. Without a
    g_idx (older checkpoints) the groups are k // group_size, the config's size: the scales alone do not say
    it (K 576 in 5 groups is g128, with a short last group, not 116)."""
    K = qweight.shape[0] * 32 // bits
    N = qweight.shape[1]
    codes = unpack_qweight(qweight, bits, K)
    zeros = unpack_qzeros(qzeros, bits, N, checkpoint_format)
    if g_idx is None:
        G = scales.shape[0]
        if group_size is None:
            if G > 1:
                raise FormatError(f"no g_idx and {G} groups for K {K}: pass the config's group size")
            group_size = -1
        if num_groups(K, group_size) != G:
            raise FormatError(f"{G} groups of scales for K {K} at group size {group_size}")
        g_idx = default_g_idx(K, group_size)
    g = g_idx.to(device=codes.device, dtype=torch.long)
    s = scales.to(dtype)
    return s[g] * (codes.to(dtype) - zeros[g].to(dtype))


def default_g_idx(K: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order (or with static groups): k // g, all zeros for group_size -1."""
    if group_size == -1:
        return torch.zeros(K, dtype=torch.int32)
    return torch.arange(K, dtype=torch.int32) // group_size


def num_groups(K: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-K // group_size)


# ---------------------------------------------------------------------------------------------
# v1 / v2 zeros
# ---------------------------------------------------------------------------------------------
def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise FormatError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, "
                          f"got {checkpoint_format!r}")


def convert_qzeros(qzeros: torch.Tensor, bits: int, from_format: str, to_format: str) -> torch.Tensor:
    """Rewrite packed zeros between v1 (z-1) and v2 (z), field by field (3-bit safe)."""
    _check_format(from_format)
    _check_format(to_format)
    if from_format == to_format:
        return qzeros.clone()
    N = qzeros.shape[1] * 32 // bits
    zeros = unpack_qzeros(qzeros, bits, N, from_format)
    if to_format == "gptq" and zeros.numel() and int(zeros.min()) <= 0:
        raise FormatError("cannot convert to v1 ('gptq'): a zero point is 0")
    if zeros.numel() and int(zeros.max()) >= 2**bits:
        raise FormatError(f"cannot convert: a zero point is {int(zeros.max())}, beyond {bits} bits")
    return pack_qzeros(zeros, bits, to_format)


def symmetric_zero_format(qzeros: torch.Tensor, bits: int) -> str | None:
    """Which format the stored zeros of a symmetric layer say: 'gptq' if every field is
    2^(b-1)-1, 'gptq_v2' if every field is 2^(b-1), None if neither (not symmetric after all)."""
    N = qzeros.shape[1] * 32 // bits
    raw = unpack_qzeros_raw(qzeros, bits, N)
    mid = 2 ** (bits - 1)
    if bool((raw == mid - 1).all()):
        return "gptq"
    if bool((raw == mid).all()):
        return "gptq_v2"
    return None


def resolve_checkpoint_format(config: "QuantizeConfig", qzeros_sample: torch.Tensor) -> tuple[str, str | None]:
    """Trust checkpoint_format, except that a symmetric checkpoint whose stored zero says the other
    format is mislabeled: return (format to use, warning or None)."""
    label = config.checkpoint_format
    if not config.sym:
        return label, None
    seen = symmetric_zero_format(qzeros_sample, config.bits)
    if seen is None or seen == label:
        return label, None
    return seen, (f"checkpoint says checkpoint_format={label!r} but its symmetric zero points are stored "
                  f"as {seen!r} ({2 ** (config.bits - 1) - (1 if seen == 'gptq' else 0)}); reading it as {seen!r}")


# ---------------------------------------------------------------------------------------------
# quantize config
# ---------------------------------------------------------------------------------------------
@dataclass
class QuantizeConfig:
    """The quantize config of GPTQ_FORMAT.md; unknown keys of foreign configs are kept in `extra`."""
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True
    damp_percent: float = 0.01
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    model_name_or_path: str | None = None
    model_file_base_name: str | None = None
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "QuantizeConfig":
        try:
            self.bits = int(self.bits)
            self.group_size = int(self.group_size)
            self.damp_percent = float(self.damp_percent)
        except (TypeError, ValueError):
            raise FormatError(f"quantize config: bits, group_size and damp_percent must be numbers "
                              f"(got {self.bits!r}, {self.group_size!r}, {self.damp_percent!r})") from None
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"quantize config: bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, "
                              f"got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise FormatError(f"quantize config: group_size must be -1 or positive, got {self.group_size}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise FormatError(f"quantize config: checkpoint_format {self.checkpoint_format!r} is not supported "
                              f"(supported: {', '.join(CHECKPOINT_FORMATS)})")
        if not (0.0 <= self.damp_percent <= 1.0):
            raise FormatError(f"quantize config: damp_percent must be in [0, 1], got {self.damp_percent}")
        for name in ("desc_act", "static_groups", "sym", "true_sequential", "lm_head"):
            setattr(self, name, bool(getattr(self, name)))
        if not isinstance(self.meta, dict):
            raise FormatError("quantize config: meta must be an object")
        return self

    def to_dict(self) -> dict:
        out = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["quant_method"] = "gptq"
        if out["model_name_or_path"] is None:
            del out["model_name_or_path"]
        if out["model_file_base_name"] is None:
            del out["model_file_base_name"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeConfig":
        if not isinstance(data, dict):
            raise FormatError("quantize config must be a JSON object")
        data = dict(data)
        # newer GPTQModel writes "method" and "format"; older tools "quant_method" and "checkpoint_format"
        method = str(data.pop("quant_method", None) or data.pop("method", None) or "gptq").lower()
        if method != "gptq":
            raise FormatError(f"quantization method {method!r} is not GPTQ; this backend reads GPTQ only")
        if "bits" not in data:
            raise FormatError("quantize config has no 'bits'")
        pack_dtype = str(data.pop("pack_dtype", "int32") or "int32").lower().replace("torch.", "")
        if pack_dtype != "int32":
            raise FormatError(f"codes packed in {pack_dtype} words are not supported (GPTQ packs int32)")
        fmt = data.get("checkpoint_format") or data.pop("format", None)
        if fmt is None:  # AutoGPTQ and GPTQ-for-LLaMa wrote no format: v1 zeros
            fmt = "gptq"
        if data.pop("is_marlin_format", False):
            raise FormatError("Marlin-repacked checkpoints (is_marlin_format) are not supported; "
                              "use the original GPTQ checkpoint")
        data["checkpoint_format"] = str(fmt).lower()
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)


def read_quantize_config(folder: str | os.PathLike) -> QuantizeConfig:
    """quantize_config.json, else quant_config.json, else config.json's quantization_config."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            return QuantizeConfig.from_dict(_read_json(path))
    path = folder / "config.json"
    if path.is_file():
        qc = _read_json(path).get("quantization_config")
        if qc is not None:
            return QuantizeConfig.from_dict(qc)
    raise FormatError(f"{folder.name}: no GPTQ quantize config (looked for {', '.join(CONFIG_FILES)} "
                      f"and config.json's quantization_config)")


def write_quantize_config(folder: str | os.PathLike, config: QuantizeConfig, base_config_dict: dict) -> None:
    """Write quantize_config.json and config.json (= base config + quantization_config)."""
    folder = Path(folder)
    config.validate()
    qc = config.to_dict()
    base = dict(base_config_dict)
    base["quantization_config"] = qc
    _write_json(folder / "quantize_config.json", qc)
    _write_json(folder / "config.json", base)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path.name} is not a JSON object")
    return data


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# weight files
# ---------------------------------------------------------------------------------------------
def find_weight_files(folder: str | os.PathLike, config: QuantizeConfig | None = None) -> list[Path]:
    """The safetensors files holding a checkpoint's tensors, in the order tools look for them:
    model.safetensors, its sharded index, model_file_base_name and gptq_model-{b}bit-{g}g (each as one file
    or as shards with `<name>.safetensors.index.json`: AutoGPTQ and GPTQModel name the index after the
    base name), a lone index, and a lone *.safetensors. Pickled weights are never read."""
    folder = Path(folder)
    bases = ["model"]
    if config is not None:
        if config.model_file_base_name and Path(config.model_file_base_name).name == config.model_file_base_name:
            bases.append(config.model_file_base_name)
        bases.append(f"gptq_model-{config.bits}bit-{config.group_size}g")
    for base in bases:
        single, index = folder / f"{base}.safetensors", folder / f"{base}.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            return _shards_from_index(index)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _shards_from_index(indexes[0])
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if len(found) > 1:
        raise FormatError(f"{folder.name}: several .safetensors files and no index (model.safetensors.index.json "
                          f"or <base name>.safetensors.index.json) to say which belong together: {', '.join(p.name for p in found)}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise FormatError(f"{folder.name}: only pickled weights ({', '.join(pickles)}); gptq-webui reads "
                          f"safetensors only. Convert the checkpoint to safetensors first.")
    raise FormatError(f"{folder.name}: no weight file (model.safetensors, shards with an index, or "
                      f"gptq_model-*.safetensors)")


def _shards_from_index(index: Path) -> list[Path]:
    """The shards an index's weight_map names, each once, in order; a shard outside the folder or missing
    is an error (a half-copied checkpoint must not load as a model with missing layers)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index.name} has no weight_map")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        path = index.parent / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise FormatError(f"{index.name} names shard {name!r}, which is not in {index.parent.name}")
        shards.append(path)
    return shards
