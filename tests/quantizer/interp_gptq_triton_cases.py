"""The Triton GPTQ segment kernel (quantizer/gptq_triton.py) under TRITON_INTERPRET=1 on CPU tensors,
against the torch loop of `gptq_quantize`: bits 2/3/4/8, group sizes 32/64/128/-1 with K = 200 (a short
last block of 72 columns, and no group size dividing K), sym and asym, act-order with and without
static groups, MSE fits, dead columns, one program or several (with a partial last one). Also the
kernel alone on exact rounding ties. Run by test_gptq_triton.py in a fresh interpreter: triton reads
TRITON_INTERPRET when the kernel is decorated."""
from __future__ import annotations

import pytest
import torch

from quantizer import gptq_triton
from quantizer.gptq import GPTQOptions, gptq_quantize
from quantizer.grid import GridSpec, dequantize, quantize

K = 200


@pytest.fixture(autouse=True)
def interpreted():
    assert gptq_triton.available() and gptq_triton.interpreting()


@pytest.fixture
def segments(monkeypatch):
    """Counts the kernel launches, so a case cannot pass by silently taking the torch loop."""
    calls = []
    run = gptq_triton.run_segment

    def counted(*args, **kw):
        calls.append(args[6:8])
        return run(*args, **kw)

    monkeypatch.setattr(gptq_triton, "run_segment", counted)
    return calls


def _problem(n, seed, dead=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, K, generator=gen) * 0.02
    W[0] = 0  # an all-zero row (scale falls back to 1)
    X = torch.randn(3 * K, K, generator=gen) * (torch.rand(K, generator=gen) * 2 + 0.1)
    H = 2 * X.T @ X / X.shape[0]
    if dead:
        H[:, :dead] = 0
        H[:dead, :] = 0
    return W, H


CASES = [  # n, bits, group, sym, act_order, static, mse, dead, rows per program
    (64, 4, 128, True, False, False, False, 0, 128),
    (48, 3, 32, False, True, False, False, 0, 128),
    (80, 2, 64, True, True, True, False, 0, 128),
    (64, 8, -1, False, False, False, False, 3, 128),
    (72, 4, 32, True, True, True, True, 0, 128),
    (56, 2, 128, False, True, False, False, 2, 128),
    (72, 3, 64, False, False, False, False, 0, 32),   # 3 programs, the last one partial
]


@pytest.mark.parametrize("n,bits,group,sym,act,static,mse,dead,rows", CASES,
                         ids=[f"b{c[1]}-g{c[2]}-{'sym' if c[3] else 'asym'}{'-act' if c[4] else ''}"
                              f"{'-static' if c[5] else ''}{'-mse' if c[6] else ''}-r{c[8]}" for c in CASES])
def test_triton_segments_match_the_torch_loop(monkeypatch, segments, n, bits, group, sym, act, static, mse, dead, rows):
    monkeypatch.setattr(gptq_triton, "ROWS", rows)
    W, H = _problem(n, seed=bits * 1000 + n + dead, dead=dead)
    spec = GridSpec(bits=bits, group_size=group, sym=sym, mse=mse)
    ref = gptq_quantize(W, H, spec, GPTQOptions(act_order=act, static_groups=static, loop="torch"))
    assert not segments
    got = gptq_quantize(W, H, spec, GPTQOptions(act_order=act, static_groups=static, loop="triton"))
    g = K if group == -1 else group
    blocks = -(-K // 128)
    # one launch per block with static groups or one group; else one more wherever a group starts inside a block
    expected = blocks if (static or group == -1) else len({0, 128} | set(range(0, K, g)))
    assert len(segments) == expected, segments
    assert (got.codes == ref.codes).float().mean().item() >= 0.999
    assert torch.equal(got.scales, ref.scales) and torch.equal(got.zeros, ref.zeros)
    assert torch.equal(got.g_idx, ref.g_idx)
    assert got.damp == ref.damp
    assert float((got.weight - ref.weight).norm() / ref.weight.norm()) < 1e-4
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)
    if dead:
        assert torch.all(got.weight[:, :dead] == 0)
    # exactly what a reader dequantizes
    gi = got.g_idx.long()
    assert torch.equal(got.weight, got.scales[gi].T * (got.codes.float() - got.zeros[gi].T.float()))
    assert got.codes.min() >= 0 and got.codes.max() <= spec.maxq


def test_kernel_rounds_ties_to_even_and_clamps_like_the_grid():
    """Hinv1 = I (no error propagation), w/scale on exact .5 ties and far outside the grid: codes,
    errors and the updated block match grid.quantize/dequantize column by column."""
    n, count, maxq = 16, 40, 15
    gen = torch.Generator().manual_seed(1)
    ties = torch.arange(-12, 12).float() + 0.5
    W1 = ties[torch.randint(0, len(ties), (n, count), generator=gen)]
    W1[0, :4] = torch.tensor([1e9, -1e9, 2.5e6, -3.5])  # far outside: clamped
    scale = torch.full((n,), 1.0)[:, None].expand(n, count)  # a per-row constant: column stride 0
    zero = torch.full((n, count), 8.0)
    Hinv1 = torch.eye(count) * 2.0
    codes = torch.full((n, count), -1.0)
    Err1 = torch.zeros(n, count)
    Wk = W1.clone()
    gptq_triton.run_segment(Wk, Hinv1, scale, zero, codes, Err1, 3, 31, maxq)
    q = quantize(W1, scale, zero, maxq)
    err = (W1 - dequantize(q, scale, zero)) / 2.0
    assert torch.equal(codes[:, 3:31], q[:, 3:31])
    assert torch.all(codes[:, :3] == -1) and torch.all(codes[:, 31:] == -1)  # outside the segment: untouched
    assert torch.equal(Err1[:, 3:31], err[:, 3:31]) and torch.all(Err1[:, :3] == 0) and torch.all(Err1[:, 31:] == 0)
    expect = W1.clone()
    expect[:, 3:31] -= err[:, 3:31] * 2.0
    assert torch.equal(Wk, expect)
