"""Triton kernel for one decoding step's attention: append this token's key and value to the static
cache and attend over every position up to it, in one launch per layer.

Why: a static-cache decoding step through the HF attention costs five launches per layer for the cache
write alone (arange, two position adds, two index_copy) and a flash-attention kernel over the whole
cache length with a mask, about 14 us per layer on an H100 (bench/RESULTS.md, "Decoding step profile").
This kernel reads the position from a device tensor (so a CUDA graph replays it at every position),
reads only the filled part of the cache, and splits long caches across programs (flash-decoding):
each split writes its running max, sum and weighted values to a workspace, and the last split of a
head to arrive (an atomic ticket, as in the split-K matmuls) merges them and resets its ticket.
The new token's own key and value come from the inputs, never from the cache slot being written, so
no program waits for another's store.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from backends.gptq.triton_kernels import gdc_launch_dependents, gdc_wait

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # a constexpr: compiled kernels read no other globals; finite "minus infinity": exp2(NEG - m) is 0 and never NaN


@triton.jit
def _rotated(x_ptr, cos_ptr, sin_ptr, d, dmask, D: tl.constexpr, ROTARY: tl.constexpr):
    """x[d] (float32), times cos plus rotate_half(x) times sin when ROTARY: rotate_half(x)[d] is
    -x[d + D/2] in the first half and x[d - D/2] in the second."""
    x = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if ROTARY:
        half: tl.constexpr = D // 2
        partner = tl.load(x_ptr + (d + half) % D, mask=dmask, other=0.0).to(tl.float32)
        partner = tl.where(d < half, -partner, partner)
        c = tl.load(cos_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        x = x * c + partner * sn
    return x


@triton.jit
def decode_attention_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, ws_ptr, ticket_ptr,
                            cos_ptr, sin_ptr, scale_log2, chunk, stride_qh, stride_knh, stride_vnh,
                            stride_kch, stride_kcl, stride_vch, stride_vcl, where_ptr,
                            GROUP: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BLOCK: tl.constexpr,
                            SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, ROTARY: tl.constexpr = False,
                            PDL: tl.constexpr = False, SCATTER: tl.constexpr = False):
    """Program (h, s): query head h over cache positions [s * chunk, min((s + 1) * chunk, pos));
    split 0 also takes the new token (position pos) and writes it to the cache for its kv head.
    ROTARY: q and the new k arrive before the rotary embedding, which is applied here (LLaMA's
    x * cos + rotate_half(x) * sin, cos and sin of the token's position, [D] each): one launch less.
    PDL (programmatic dependent launch): wait for the previous kernel (q, k, v's producer) first, then
    let the next kernel (the output projection) start reading its weights while this one runs.
    SCATTER: output value (h, d) goes to position where[h * D + d] instead of h * D + d (the order an
    act-order output projection reads its input in, act_order.py)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    h = tl.program_id(0)
    s = tl.program_id(1)
    kvh = h // GROUP
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D_P2)
    dmask = d < D
    q = _rotated(q_ptr + h * stride_qh, cos_ptr, sin_ptr, d, dmask, D, ROTARY) * scale_log2
    if ROTARY:
        kn = _rotated(kn_ptr + kvh * stride_knh, cos_ptr, sin_ptr, d, dmask, D, ROTARY).to(kc_ptr.dtype.element_ty)
    else:
        kn = tl.load(kn_ptr + kvh * stride_knh + d, mask=dmask, other=0.0)
    vn = tl.load(vn_ptr + kvh * stride_vnh + d, mask=dmask, other=0.0)
    first = s == 0
    if first & (h % GROUP == 0):
        tl.store(kc_ptr + kvh * stride_kch + pos * stride_kcl + d, kn, mask=dmask)
        tl.store(vc_ptr + kvh * stride_vch + pos * stride_vcl + d, vn, mask=dmask)
    # scores live in the log2 domain (q carries scale * log2(e)): exp2 instead of exp
    own = tl.sum(q * kn.to(tl.float32), axis=0)
    m = tl.where(first, own, NEG)
    l = tl.where(first, 1.0, 0.0)
    acc = tl.where(first, vn.to(tl.float32), 0.0)

    start = s * chunk
    end = tl.minimum(start + chunk, pos)
    offs = tl.arange(0, BLOCK)
    for off in range(start, end, BLOCK):
        p = off + offs
        pmask = p < end
        tile_mask = pmask[:, None] & dmask[None, :]
        # both tiles are requested before either is used: one memory round trip per tile, not two
        k = tl.load(kc_ptr + kvh * stride_kch + p[:, None] * stride_kcl + d[None, :], mask=tile_mask, other=0.0)
        v = tl.load(vc_ptr + kvh * stride_vch + p[:, None] * stride_vcl + d[None, :], mask=tile_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(pmask, scores, NEG)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp2(m - m_new)
        weights = tl.exp2(scores - m_new)
        l = l * alpha + tl.sum(weights, axis=0)
        acc = acc * alpha + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
        m = m_new

    dst = h * D + d
    if SCATTER:
        dst = tl.load(where_ptr + dst, mask=dmask, other=0)
    if SPLITS == 1:
        tl.store(out_ptr + dst, (acc / l).to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        row = D_P2 + 2
        base = ws_ptr + (h * SPLITS + s) * row
        tl.store(base + d, acc)
        tl.store(base + D_P2, m)
        tl.store(base + D_P2 + 1, l)
        tl.debug_barrier()  # every thread's partials are written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + h, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:  # the last split of this head: merge, write, reset the ticket
            sp = tl.arange(0, SPLITS_P2)
            smask = sp < SPLITS
            rows = ws_ptr + (h * SPLITS + sp) * row
            ms = tl.load(rows + D_P2, mask=smask, other=NEG, cache_modifier=".cg")
            ls = tl.load(rows + D_P2 + 1, mask=smask, other=0.0, cache_modifier=".cg")
            accs = tl.load(rows[:, None] + d[None, :], mask=smask[:, None], other=0.0, cache_modifier=".cg")
            top = tl.max(ms, axis=0)
            w = tl.exp2(ms - top)
            total = tl.sum(ls * w, axis=0)
            merged = tl.sum(accs * w[:, None], axis=0) / total
            tl.store(out_ptr + dst, merged.to(out_ptr.dtype.element_ty), mask=dmask)
            tl.atomic_xchg(ticket_ptr + h, 0, sem="relaxed", scope="gpu")


INTERPRETED = isinstance(decode_attention_kernel, InterpretedFunction)
