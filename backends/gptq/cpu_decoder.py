"""Decoding on CPU without the HF forward: the decoder layers of LLaMA-family models written out in torch
ops over a static KV cache, q/k/v and gate/up each one call of the packed int4 kernel.

Why: on a CPU the HF forward of a small model spends a large part of every step in Python and bookkeeping
(mask building, cache objects, attention dispatch, output classes) rather than in the matmuls. On the
default model (one thread) the step below decodes 1.22-1.24x faster with the same weights and the same
kernels, and prefills 1.23x faster (the prompt's logits at its last position only; `python -m bench.compare`,
`python -m bench.decode --cpu`, bench/RESULTS.md 2026-12-05). It follows torch_generation's step protocol,
step(input_ids, cache) -> (logits, cache), like cuda_graph.GraphDecoder on CUDA.

Only models whose layers compute exactly what is written here run it (`unsupported`): LLaMA, Mistral
(within its sliding window), Qwen2 and Qwen3. Everything else, and `cpu_decoder=false`, decodes through the
HF forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from backends.base import BackendError
from backends.gptq import cpu_int4

# decoder layer classes whose forward is: x + o(attn(rope(q), rope(k), v)) on the input norm, then
# x + down(act(gate) * up) on the post-attention norm (transformers 5.x); Qwen3 adds q/k norms per head
LAYER_TYPES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def unsupported(model, max_len: int) -> str | None:
    """Why this model cannot decode through `CpuDecoder` (None when it can)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} is not a LLaMA-style causal LM"
    kinds = {type(layer).__name__ for layer in layers}
    if not kinds <= set(LAYER_TYPES):
        return f"decoder layers {sorted(kinds - set(LAYER_TYPES))} are not written out here"
    for layer in layers:  # the parts the step reads (another transformers version may name them otherwise)
        for owner, names in ((layer, ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")),
                             (getattr(layer, "self_attn", None), ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")),
                             (getattr(layer, "mlp", None), ("gate_proj", "up_proj", "down_proj", "act_fn"))):
            missing = [name for name in names if not hasattr(owner, name)]
            if missing:
                return f"{type(owner).__name__} has no {', '.join(missing)}"
    config = model.config
    window = getattr(config, "sliding_window", None)
    sliding = (getattr(config, "use_sliding_window", True) and window is not None
               and any(t == "sliding_attention" for t in (getattr(config, "layer_types", None) or ["sliding_attention"])))
    if sliding and window < max_len:
        return f"a sliding attention window ({window}) shorter than the cache ({max_len})"
    return None


def _check(model, max_len: int) -> None:
    reason = unsupported(model, max_len)
    if reason is not None:
        raise BackendError(f"CPU decoder: {reason}")


@dataclass
class _Layer:
    """What one decoder layer's step reads, resolved once: its norms (`_norm`), projections and, where they
    fuse, q/k/v and gate/up as one int4 weight each; Qwen3's per-head q and k norms (None elsewhere)."""
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    attn: torch.nn.Module
    mlp: torch.nn.Module
    qkv: cpu_int4.Int4Weight | None
    qkv_bias: torch.Tensor | None
    gate_up: cpu_int4.Int4Weight | None
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None


class CpuDecoder:
    """A static KV cache of `max_len` positions and the step over it. One instance serves a model's
    generations one after another (a new prompt resets it)."""

    def __init__(self, model, max_len: int):
        _check(model, max_len)  # before anything is read or fused
        self.model = model
        self.inner = model.model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.dtype = self.inner.embed_tokens.weight.dtype
        self.layers = [self._layer(layer, self.dtype) for layer in self.inner.layers]
        self.final_norm = _norm(self.inner.norm, self.dtype)
        half = self.head_dim // 2
        self.sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(self.dtype)
        self._allocate(max_len)

    def resize(self, max_len: int) -> None:
        """A cache of max_len positions (the next step must start a prompt): the fused weights are kept."""
        _check(self.model, max_len)
        self._allocate(max_len)

    def _allocate(self, max_len: int) -> None:
        dtype = self.dtype
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.keys = self.values = None  # the old cache goes before the new one is allocated
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.max_len, self.pos = max_len, 0

    @staticmethod
    def _layer(layer, dtype: torch.dtype) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        qkv = qkv_bias = gate_up = None
        if all(b is None for b in biases) or all(b is not None for b in biases):  # else each its own call
            qkv = _fused_int4([attn.q_proj, attn.k_proj, attn.v_proj])
            qkv_bias = torch.cat(biases) if qkv is not None and biases[0] is not None else None
        if mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
            gate_up = _fused_int4([mlp.gate_proj, mlp.up_proj])
        per_head = hasattr(attn, "q_norm")  # Qwen3: RMSNorm over each head before the rotary embedding
        return _Layer(_norm(layer.input_layernorm, dtype), _norm(layer.post_attention_layernorm, dtype), attn, mlp,
                      qkv, qkv_bias, gate_up, _norm(attn.q_norm, dtype) if per_head else None,
                      _norm(attn.k_norm, dtype) if per_head else None)

    def step(self, input_ids: torch.Tensor, cache):
        n = input_ids.shape[1]
        if cache is None:  # a new prompt
            self.pos = 0
        if self.pos + n > self.max_len:
            raise BackendError(f"the static cache of {self.max_len} tokens is full")
        logits = self._forward(input_ids, self.pos)
        self.pos += n
        return logits, self

    def _forward(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        n, end = input_ids.shape[1], start + input_ids.shape[1]
        h = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(h, torch.arange(start, end).view(1, -1))
        # rotate_half(x) * sin is roll(x, dim / 2) * (sign * sin): one op for the halves' swap and negation
        rope = (cos.unsqueeze(1), (sin * self.sign).unsqueeze(1))
        # one token attends to every cached position; a block of n attends causally (row i to start + i)
        mask = None if n == 1 else torch.ones(n, end, dtype=torch.bool).tril(start)
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            q, k, v = self._qkv(layer, layer.input_norm(h), n, rope)
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v
            o = F.scaled_dot_product_attention(q, self.keys[i, :, :, :end], self.values[i, :, :, :end],
                                               attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=self.kv_heads != self.heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, n, self.heads * self.head_dim))
            x = layer.post_norm(h)
            mlp = layer.mlp
            if layer.gate_up is not None:
                gate, up = layer.gate_up.linear(x).chunk(2, -1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.model.lm_head(self.final_norm(h[:, -1:]))

    def _qkv(self, layer: _Layer, x: torch.Tensor, n: int, rope):
        """q [1, heads, n, dim], k and v [1, kv_heads, n, dim], q and k rotated (one rotation for both where
        they come from one fused call and no per-head norm sits between)."""
        heads, kv_heads, dim, attn = self.heads, self.kv_heads, self.head_dim, layer.attn
        if layer.qkv is not None:
            qkv = layer.qkv.linear(x, layer.qkv_bias)
            v = qkv[..., (heads + kv_heads) * dim:].view(1, n, kv_heads, dim).transpose(1, 2)
            if layer.q_norm is None:
                qk = _rotate(qkv[..., :(heads + kv_heads) * dim].view(1, n, heads + kv_heads, dim).transpose(1, 2),
                             rope)
                return qk[:, :heads], qk[:, heads:], v
            q, k = qkv[..., :heads * dim], qkv[..., heads * dim:(heads + kv_heads) * dim]
        else:
            q, k = attn.q_proj(x), attn.k_proj(x)
            v = attn.v_proj(x).view(1, n, kv_heads, dim).transpose(1, 2)
        q, k = q.reshape(1, n, heads, dim), k.reshape(1, n, kv_heads, dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        return _rotate(q.transpose(1, 2), rope), _rotate(k.transpose(1, 2), rope), v


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor: x cos + rotate_half(x) sin, with rotate_half(x) sin as
    roll(x) (sign sin) (the same products: a negation moved from x to sin is exact)."""
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _norm(module: torch.nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's RMSNorm module as torch's one-op rms_norm where activations are fp32 and it has the usual
    weight and epsilon (HF's LLaMA-family norms compute the same there: equal to the bit where checked); the
    module itself otherwise (below fp32 torch's op rounds differently)."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if dtype != torch.float32 or not isinstance(eps, float) or not isinstance(weight, torch.Tensor):
        return module
    return lambda x: F.rms_norm(x, (x.shape[-1],), weight, eps)


def _fused_int4(projections) -> cpu_int4.Int4Weight | None:
    """The siblings' int4 weights as one (`cpu_int4.fuse`), or None where one of them is not on the kernel."""
    weights = [getattr(p, "int4", None) for p in projections]
    if any(w is None for w in weights) or any(getattr(p, "weight_cache", None) is not None for p in projections):
        return None
    return cpu_int4.fuse(weights)
