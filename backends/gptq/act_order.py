"""Act-order without its gathers, where the model allows: exact rewrites of a loaded model.

An act-order layer's kernel rows are sorted by group at load (quant_linear.sort_by_group), so its input
has to be read in that order too, x[perm]. Inside the matrix-vector kernel that gather is a chain of
dependent reads at each program's start: +13-15% over the same checkpoint without act-order on an H100
(bench/RESULTS.md). Most inputs can instead be produced in the wanted order by the kernel before:

- down_proj's input is act(gate_proj(x)) * up_proj(x), column by column. Storing gate's and up's output
  columns in down's order (their qweight, scales, zeros and bias columns permuted once, at load) makes
  that product come out sorted, so down runs without a perm at every batch size (`fold_mlp_orders`).
- q/k/v and gate/up read an RMSNorm's output, o_proj the attention's. The norm kernel (when decoding
  and in prompts) and the decoding attention kernel write their output in their readers' order and mark
  the tensor (`mark_sorted`); a QuantLinear whose perm is that very order then skips its gather
  (`presort_inputs`, cuda_graph.ResidualRoute, decode_attention.DecodeAttentionRoute).

Prompts keep o_proj's gather (their attention is HF's), one launch per layer amortised over the rows.
"""
from __future__ import annotations

import torch

ORDER_ATTR = "gptq_column_order"
# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) with an elementwise act_fn
# (checked in transformers 5.x)
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def mark_sorted(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Record that t's last dimension holds its columns in `order` (t[..., i] is column order[i])."""
    setattr(t, ORDER_ATTR, order)
    return t


def column_order(t: torch.Tensor) -> torch.Tensor | None:
    """The order mark_sorted recorded on this very tensor (views and copies carry none)."""
    return getattr(t, ORDER_ATTR, None)


def natural_order(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t with its columns put back in natural order (for a reader that wants another order)."""
    out = torch.empty_like(t)
    out[..., order.long()] = t
    return out


def _unfused_kernel_layers(layers) -> bool:
    from backends.gptq.quant_linear import QuantLinear
    return all(isinstance(l, QuantLinear) and l.kernel is not None and l.group is None for l in layers)


def fold_mlp_orders(model) -> int:
    """Give each gated MLP's down_proj its input already sorted (see the module docstring). Run before
    fusion.fuse_siblings. Returns how many MLPs were folded."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in GATED_MLPS:
            continue
        gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if not _unfused_kernel_layers((gate, up, down)) or down.kernel.perm is None:
            continue
        order = down.kernel.perm
        gate.reorder_outputs(order)
        up.reorder_outputs(order)
        down.take_sorted_inputs()
        count += 1
    return count


def shared_input_order(layers) -> torch.Tensor | None:
    """The one act-order perm every layer reads its input in, made the same tensor object in all of
    them (QuantLinear recognises a sorted input by identity); None when they differ or one has none."""
    from backends.gptq.quant_linear import QuantLinear
    if not layers or not all(isinstance(l, QuantLinear) for l in layers):
        return None
    perms = [l.input_perm() for l in layers]
    first = perms[0]
    if first is None or any(p is None or (p is not first and not torch.equal(p, first)) for p in perms):
        return None
    for layer in layers:
        layer.share_input_perm(first)
    return first


def presort_inputs(model) -> int:
    """Ask the kernels that feed act-order projections when decoding to write their output in the
    order those projections read: each decoder layer's input norm in its q/k/v order and its
    post-attention norm in its gate/up order (the residual route, cuda_graph.fuse_residual_norms,
    run first), where those projections share one perm; and the routed attention
    (decode_attention.route_decode_attention, run first) in its o_proj's order. Returns how many
    producers write sorted rows."""
    from backends.gptq.cuda_graph import residual_route
    from backends.gptq.decode_attention import decode_route
    norms, attention = residual_route(model), decode_route(model)
    count = 0
    for layer in getattr(getattr(model, "model", model), "layers", ()):
        attn, mlp = layer.self_attn, layer.mlp
        if norms is not None:
            pairs = ((layer.input_layernorm, [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]),
                     (layer.post_attention_layernorm, [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]))
            for norm, readers in pairs:
                order = shared_input_order(readers)
                if order is not None:
                    norms.orders[norm] = (order, norm.weight.detach().index_select(0, order.long()).contiguous())
                    count += 1
        if attention is not None and getattr(attn.forward, "decode_route", None) is attention:
            order = shared_input_order([getattr(attn, "o_proj", None)])
            if order is not None:
                attention.orders[attn] = (order, torch.argsort(order).to(torch.int32))
                count += 1
    return count
