"""Single-token attention over the static KV cache in one kernel launch per layer (attention_kernel.py),
routed into a HF LLaMA-family model's attention modules for decoding steps.

Why: in a CUDA-graph decoding step of a 7B model the HF attention path (cache write through arange,
position adds and two index_copy, then masked SDPA over the whole cache) costs more GPU time than the
whole o_proj matmul of the layer. The routed forward computes the same thing: projections, rotary
(the model's own function, compiled or not), then one kernel that appends k and v at the position
given by `position_ids` and attends over positions 0..pos. Everything else (prompts, other devices,
dynamic caches, sliding windows, models with extra attention features) runs the original forward.
"""
from __future__ import annotations

import logging
import sys

import torch
import triton

from backends.gptq import act_order
from backends.gptq.kernel_runtime import SplitScratch, disagreement, sm_count
from backends.gptq.parallel_compile import launcher

log = logging.getLogger(__name__)

BLOCK = 64                 # cache positions per tile
PROGRAMS_PER_SM = 4        # split long caches until the launch has about this many programs per SM
# architectures whose attention is exactly: projections, LLaMA's rotate-half rotary embedding (applied
# in the kernel when cos/sin hold head_dim values, else by the modeling module's apply_rotary_pos_emb),
# softmax(q k^T * scaling) v over all earlier positions, o_proj
ROUTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def split_count(max_len: int, q_heads: int, device) -> int:
    """Splits of the cache per head: enough programs to fill the GPU, never a split under one tile."""
    tiles = -(-max_len // BLOCK)
    return max(1, min(tiles, (PROGRAMS_PER_SM * sm_count(device)) // max(q_heads, 1)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, scaling: float, scratch: SplitScratch,
                     splits: int | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                     pdl: bool = False, where: torch.Tensor | None = None) -> torch.Tensor:
    """q [1, Hq, 1, D], k and v [1, Hkv, 1, D], caches [1, Hkv, L, D], pos a one-element integer tensor
    on the same device. Writes k and v at position pos of the caches and returns the attention output
    [1, 1, Hq, D] over positions 0..pos (no mask: everything before the token is visible).
    rotary=(cos, sin), D values each for this position: q and k are given before LLaMA's rotary
    embedding, which the kernel applies (and the cache receives the rotated k).
    pdl: launch as a programmatic dependent launch (sm_90+, see kernel_runtime.pdl_supported).
    where (int32 [Hq * D], a permutation): the output's flat value i lands at position where[i] (the
    inverse of the act-order perm the output projection reads its input by, act_order.py)."""
    from backends.gptq.attention_kernel import LOG2E, decode_attention_kernel
    _, hq, _, dim = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    if q.shape[0] != 1 or q.shape[2] != 1 or k.shape != (1, hkv, 1, dim) or v.shape != k.shape:
        raise ValueError(f"decode_attention takes one token of one sequence, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % hkv or v_cache.shape != k_cache.shape or k_cache.shape[3] != dim:
        raise ValueError(f"heads or cache shapes do not match: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the cache's last dimension must be contiguous")
    splits = splits or split_count(max_len, hq, q.device)
    per_split = -(-max_len // splits)
    chunk = -(-per_split // BLOCK) * BLOCK  # whole tiles per split
    splits = -(-max_len // chunk)
    d_p2 = triton.next_power_of_2(dim)
    if rotary is not None:
        cos, sin = (t.reshape(-1) for t in rotary)
        if cos.numel() != dim or sin.numel() != dim or dim % 2 or cos.stride(0) != 1 or sin.stride(0) != 1:
            raise ValueError(f"rotary cos/sin must hold head_dim = {dim} contiguous values, got {tuple(rotary[0].shape)}")
    else:
        cos = sin = q  # unused pointers
    if where is not None and (where.dtype != torch.int32 or where.numel() != hq * dim):
        raise ValueError(f"the output positions must be {hq * dim} int32 indices")
    out = torch.empty(1, 1, hq, dim, dtype=q.dtype, device=q.device)
    if splits > 1:
        ws, tickets = scratch.get(hq * splits * (d_p2 + 2), hq, q.device)
    else:
        ws = tickets = out
    launcher(decode_attention_kernel, (hq, splits))(
        q, k, v, k_cache, v_cache, pos, out, ws, tickets, cos, sin, float(scaling) * LOG2E, chunk,
        q.stride(1), k.stride(1), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2), where if where is not None else tickets,
        GROUP=hq // hkv, D=dim, D_P2=d_p2, BLOCK=BLOCK, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), ROTARY=rotary is not None, PDL=pdl, SCATTER=where is not None,
        num_warps=4,
        **({"launch_pdl": True} if pdl else {}))
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding x * cos + rotate_half(x) * sin in float64, cos/sin of D values."""
    half = x.shape[-1] // 2
    x = x.double()
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.double().reshape(-1) + rotated * sin.double().reshape(-1)


def reference_attention(q, k, v, k_cache, v_cache, pos: int, scaling: float, rotary=None) -> torch.Tensor:
    """The same step in plain torch (float64): what the kernel must match (q and k rotated first when
    rotary=(cos, sin) is given, as the kernel does)."""
    if rotary is not None:
        q, k = rotate(q, *rotary), rotate(k, *rotary)
    keys = torch.cat([k_cache[:, :, :pos].double(), k.double()], 2)
    values = torch.cat([v_cache[:, :, :pos].double(), v.double()], 2)
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    weights = torch.softmax((q.double() @ keys.transpose(-1, -2)) * scaling, -1)
    return (weights @ values).transpose(1, 2)  # [1, 1, Hq, D]


class DecodeAttentionRoute:
    """What the routed attention modules share: the device types to take the kernel on and the
    split workspace. `calls` counts the routed forwards run from Python (a graph replay adds none).
    The first routed step is checked against torch; a device whose kernel gets it wrong (or fails to
    compile it) is dropped from `device_types`, so decoding there goes on through the HF attention."""

    def __init__(self, device_types=("cuda",), pdl: bool = False):
        self.device_types = set(device_types)
        self.pdl = pdl  # launch the kernel as a programmatic dependent launch (sm_90+ only)
        self.scratch = SplitScratch()  # the split-K matmuls' partials-and-tickets buffer, same protocol
        self.calls = 0
        self.verified: set[str] = set()
        # attention module -> (perm, where): its output written in the act-order perm its o_proj reads
        # its input by (act_order.presort_inputs), where = the perm's inverse
        self.orders: dict = {}

    def verify(self, q, k, v, keys, values, position_ids, scaling, out, rotary=None, order=None) -> str | None:
        """None when `out` (the kernel's result for this step, its flat values in `order` when given)
        matches torch, else what is wrong. Runs once per device type, outside graph capture (it reads
        the position on the host)."""
        device = q.device
        if device.type in self.verified or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return None
        expected = reference_attention(q, k, v, keys, values, int(position_ids.reshape(-1)[0]), scaling, rotary)
        if order is not None:
            expected = expected.reshape(-1)[order.long()].reshape(expected.shape)
        problem = disagreement(out, expected)
        if problem is not None:
            return f"{problem} against torch"
        self.verified.add(device.type)
        return None

    def disable(self, device: torch.device, problem: str) -> None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        log.warning("decode attention kernel off on %s (%s): decoding goes through the HF attention", name, problem)
        self.device_types.discard(device.type)

    def applies(self, module, hidden_states, cache, position_ids) -> bool:
        if hidden_states is None or hidden_states.device.type not in self.device_types:
            return False
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1 or hidden_states.shape[1] != 1:
            return False
        if not isinstance(position_ids, torch.Tensor) or position_ids.numel() != 1:
            return False
        layers = getattr(cache, "layers", None)
        index = getattr(module, "layer_idx", None)
        if layers is None or index is None or index >= len(layers):
            return False
        layer = layers[index]
        keys = getattr(layer, "keys", None)
        if (getattr(layer, "is_initialized", True) is False or getattr(layer, "is_sliding", False)
                or not hasattr(layer, "max_cache_len") or not isinstance(keys, torch.Tensor) or keys.dim() != 4):
            return False  # only a plain static cache has fixed slots by position
        window = getattr(module, "sliding_window", None)
        return window is None or keys.shape[2] <= window


def decode_route(model) -> DecodeAttentionRoute | None:
    """The route shared by the model's routed attention modules (None when none is routed)."""
    for decoder_layer in getattr(getattr(model, "model", None), "layers", ()):
        route = getattr(getattr(getattr(decoder_layer, "self_attn", None), "forward", None), "decode_route", None)
        if route is not None:
            return route
    return None


def route_decode_attention(model, device_types=("cuda",), pdl: bool = False) -> int:
    """Give every LLaMA-family attention module of `model` a forward that runs single-token steps
    over a static cache through decode_attention (position from `position_ids`), and the original
    forward otherwise. Returns how many modules were routed (0 for other architectures).
    Route before a GraphDecoder of this model captures its graph: a graph replays the kernels it was
    captured with, and HF's own cache bookkeeping does not see the routed steps' writes."""
    if str(getattr(getattr(model, "config", None), "model_type", "")).lower() not in ROUTED_MODEL_TYPES:
        return 0
    route = DecodeAttentionRoute(device_types, pdl)
    count = 0
    for decoder_layer in getattr(getattr(model, "model", None), "layers", ()):
        module = getattr(decoder_layer, "self_attn", None)
        if module is None or any(hasattr(module, name) for name in ("q_norm", "k_norm", "sinks")):
            continue  # extra attention features the kernel does not have
        if not all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            continue
        if getattr(module.forward, "decode_route", None) is not None:
            module.forward.decode_route.device_types.update(device_types)  # routed before: add device types
            module.forward.decode_route.pdl = pdl
            count += 1
            continue
        module.forward = _routed_forward(module, module.forward, route)
        count += 1
    return count


def _routed_forward(module, original, route: DecodeAttentionRoute):
    rotary_module = sys.modules.get(type(module).__module__)

    def forward(*args, **kwargs):
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_ids = kwargs.get("position_ids")
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None or len(args) > 1 or not route.applies(module, hidden_states, cache, position_ids):
            return original(*args, **kwargs)
        dim = module.head_dim
        q = module.q_proj(hidden_states).view(1, 1, -1, dim).transpose(1, 2)
        k = module.k_proj(hidden_states).view(1, 1, -1, dim).transpose(1, 2)
        v = module.v_proj(hidden_states).view(1, 1, -1, dim).transpose(1, 2)
        cos, sin = embeddings
        rotary = None
        if cos.numel() == dim and sin.numel() == dim and cos.stride(-1) == 1 and sin.stride(-1) == 1:
            rotary = (cos, sin)  # LLaMA's rotary applied inside the kernel: one launch less per layer
        else:
            q, k = rotary_module.apply_rotary_pos_emb(q, k, cos, sin)  # looked up per call: may be compiled
        layer = cache.layers[module.layer_idx]
        order, where = route.orders.get(module, (None, None))
        try:
            out = decode_attention(q, k, v, layer.keys, layer.values, position_ids.reshape(1), module.scaling,
                                   route.scratch, rotary=rotary, pdl=route.pdl, where=where)
            problem = route.verify(q, k, v, layer.keys, layer.values, position_ids, module.scaling, out, rotary,
                                   order)
        except Exception as exc:  # e.g. a Triton compile error on this GPU: never worse than no kernel
            if hidden_states.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            # the kernel may have written k, v at the token's slot; HF's path writes the same values there
            route.disable(hidden_states.device, problem)
            return original(*args, **kwargs)
        route.calls += 1
        out = out.reshape(1, 1, -1)
        return module.o_proj(act_order.mark_sorted(out, order) if order is not None else out), None

    forward.__wrapped__ = original
    forward.decode_route = route
    return forward
