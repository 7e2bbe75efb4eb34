"""Round-to-nearest GPTQ checkpoints, written through format.py.

Why it exists: tests need real checkpoints of the default model in every bits/group/act-order
combination without running the full GPTQ algorithm, and the decode benchmark needs a 7B-shaped
checkpoint whose speed does not depend on the values (BENCH.md section 2). RTN gives both; the
quantizer package does the real GPTQ.
"""
from __future__ import annotations

import json
import re
import zlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.gptq import format as fmt

LINEAR_RE = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


@dataclass
class PackedLayer:
    """The tensors of one quantized linear, exactly as stored on disk."""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True,
                 act_order_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a torch Linear weight [N, K] by round-to-nearest. Returns codes [K, N], zeros [G, N],
    scales [G, N] (float16) and g_idx [K]. With `act_order_seed`, rows are grouped in a random order
    (what act-order produces: a non-monotonic g_idx), to exercise act-order loaders."""
    W = weight.t().to(torch.float32)  # [K, N]
    K, N = W.shape
    if act_order_seed is not None:
        order = torch.randperm(K, generator=torch.Generator().manual_seed(act_order_seed))
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[order] = fmt.default_g_idx(K, group_size)
    else:
        g_idx = fmt.default_g_idx(K, group_size)
    G = fmt.num_groups(K, group_size)
    maxq = 2**bits - 1
    gl = g_idx.long().to(W.device)
    if act_order_seed is None:  # contiguous groups: pad to whole groups and reduce per group
        rows = K if group_size == -1 else group_size
        padded = torch.cat([W, W[-1:].expand(G * rows - K, N)]) if G * rows > K else W
        wmin, wmax = torch.aminmax(padded.reshape(G, rows, N), dim=1)
    else:
        big = torch.finfo(torch.float32).max
        wmin = torch.full((G, N), big, device=W.device).scatter_reduce(0, gl[:, None].expand(K, N), W, "amin")
        wmax = torch.full((G, N), -big, device=W.device).scatter_reduce(0, gl[:, None].expand(K, N), W, "amax")
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if sym:
        amax = torch.maximum(wmax, -wmin)
        scale = (2 * amax / maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((wmax - wmin) / maxq).clamp(min=1e-8)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    scale = scale.half()
    s = scale.float()
    codes = torch.clamp(torch.round(W / s[gl] + zero[gl]), 0, maxq).to(torch.int32)
    return codes, zero.to(torch.int32), scale, g_idx.to(W.device)


def pack_layer(weight: torch.Tensor, bits: int, group_size: int, sym: bool, checkpoint_format: str,
               act_order_seed: int | None = None) -> PackedLayer:
    codes, zeros, scales, g_idx = rtn_quantize(weight, bits, group_size, sym, act_order_seed)
    return PackedLayer(fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, checkpoint_format),
                       scales, g_idx)


def quantize_folder(src: Path, dst: Path, bits: int = 4, group_size: int = 128, sym: bool = True,
                    checkpoint_format: str = "gptq", desc_act: bool = False, skip: tuple[str, ...] = (),
                    lm_head: bool = False) -> Path:
    """RTN-quantize every decoder linear of the HF model at `src` into a GPTQ checkpoint at `dst`
    (written to `dst.partial/`, renamed when complete). Layers whose name contains one of `skip`
    stay in float16. With `lm_head`, the output head is quantized too (untied from the embeddings)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, dst = Path(src), Path(dst)
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    out: dict[str, torch.Tensor] = {}
    for shard in fmt.find_weight_files(src):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                out_names = [name]
                if lm_head and name == "model.embed_tokens.weight" and "lm_head.weight" not in fh.keys():
                    out_names.append("lm_head.weight")  # tied head: quantize a copy of the embeddings
                for name in out_names:
                    _quantize_or_copy(out, name, tensor, bits, group_size, sym, checkpoint_format, desc_act,
                                      skip, lm_head)
    save_file(out, str(partial / "model.safetensors"), metadata={"format": "pt"})
    base_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if lm_head:
        base_config["tie_word_embeddings"] = False
    config = fmt.QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                                checkpoint_format=checkpoint_format, lm_head=lm_head,
                                meta={"quantizer": ["gptq-webui-rtn"], "method": "round-to-nearest"})
    fmt.write_quantize_config(partial, config, base_config)
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, partial / name)
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    return dst


def _quantize_or_copy(out: dict, name: str, tensor: torch.Tensor, bits, group_size, sym, checkpoint_format,
                      desc_act, skip, lm_head) -> None:
    if (LINEAR_RE.match(name) or (lm_head and name == "lm_head.weight")) and not any(s in name for s in skip):
        base = name[: -len(".weight")]
        seed = zlib.crc32(_input_name(base).encode()) if desc_act else None
        layer = pack_layer(tensor, bits, group_size, sym, checkpoint_format, seed)
        out[base + ".qweight"] = layer.qweight
        out[base + ".qzeros"] = layer.qzeros
        out[base + ".scales"] = layer.scales
        out[base + ".g_idx"] = layer.g_idx
    else:
        out[name] = tensor.half() if tensor.is_floating_point() else tensor


def _input_name(base: str) -> str:
    """One name for the siblings that read the same input (q/k/v, gate/up): GPTQ orders a layer's rows by its
    input's Hessian, which siblings share, so their act-order perms are the same; RTN's stand-in perm, drawn
    from this name, is shared the same way."""
    return re.sub(r"\.(q_proj|k_proj|v_proj)$", ".qkv", re.sub(r"\.(gate_proj|up_proj)$", ".gate_up", base))

