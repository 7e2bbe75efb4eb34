"""The GPTQ algorithm and the grid on one layer: invariants that hold exactly, and the error GPTQ must
beat RTN by on real weights of the default model."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from backends.gptq import format as gptq_format
from quantizer.grid import GridSpec, dequantize, fit, rtn
from quantizer.gptq import GPTQOptions, Hessian, gptq_quantize, relative_output_error


def _gather(q):
    g = q.g_idx.long()
    return q.scales[g].T * (q.codes.float() - q.zeros[g].T.float())


@pytest.fixture(scope="module")
def real_layer(default_hf_model):
    """Layer 3 gate_proj (K=576, N=1536) of the default model and inputs that share its statistics:
    real token embeddings, RMS-normalised."""
    with safe_open(str(default_hf_model / "model.safetensors"), framework="pt") as fh:
        w = fh.get_tensor("model.layers.3.mlp.gate_proj.weight").float()
        emb = fh.get_tensor("model.embed_tokens.weight").float()
        norm = fh.get_tensor("model.layers.3.post_attention_layernorm.weight").float()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.shape[0], (1024,), generator=gen)
    x = emb[ids]
    x = x / x.pow(2).mean(dim=1, keepdim=True).add(1e-5).sqrt() * norm
    hess = Hessian(w.shape[1], "cpu")
    hess.add(x)
    return w, hess.H


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64), (8, 128), (4, -1), (4, 100)])
def test_gptq_beats_rtn_on_a_real_layer(real_layer, bits, group):
    w, H = real_layer
    spec = GridSpec(bits=bits, group_size=group)
    r = rtn(w, spec)
    q = gptq_quantize(w, H, spec, GPTQOptions())
    err_q, err_r = relative_output_error(w, q.weight, H), relative_output_error(w, r.weight, H)
    assert err_q < 0.8 * err_r, (err_q, err_r)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("sym", [True, False])
def test_fake_weight_is_exactly_what_the_codes_say(real_layer, act_order, static, sym):
    w, H = real_layer
    spec = GridSpec(bits=4, group_size=128, sym=sym)
    q = gptq_quantize(w, H, spec, GPTQOptions(act_order=act_order, static_groups=static))
    K = w.shape[1]
    assert q.scales.shape == (5, w.shape[0])           # K=576, g=128: 5 groups, the last of 64 rows
    assert torch.equal(q.weight, _gather(q))
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15
    counts = torch.bincount(q.g_idx.long(), minlength=5)
    assert counts.tolist() == [128, 128, 128, 128, 64]
    monotonic = bool((q.g_idx[1:] >= q.g_idx[:-1]).all())
    assert monotonic == (not act_order or static)
    if sym:
        assert bool((q.zeros == 8).all())
    else:
        assert len(torch.unique(q.zeros)) > 1
    # scales are what float16 stores, so the checkpoint reproduces the weight bit for bit
    assert torch.equal(q.scales, q.scales.half().float())
    W = gptq_format.dequantize(gptq_format.pack_qweight(q.codes.T.contiguous(), 4),
                               gptq_format.pack_qzeros(q.zeros, 4, "gptq" if sym else "gptq_v2"),
                               q.scales.half(), q.g_idx, 4, "gptq" if sym else "gptq_v2")
    assert torch.equal(W.T, q.weight)
    assert W.shape == (K, w.shape[0])


def test_act_order_and_static_groups_help_at_2_bits(real_layer):
    w, H = real_layer
    spec = GridSpec(bits=2, group_size=64)
    plain = gptq_quantize(w, H, spec, GPTQOptions())
    both = gptq_quantize(w, H, spec, GPTQOptions(act_order=True, static_groups=True))
    assert relative_output_error(w, both.weight, H) < relative_output_error(w, plain.weight, H)


def test_dead_columns_are_zeroed(real_layer):
    w, H = real_layer
    H = H.clone()
    H[10, :] = 0
    H[:, 10] = 0
    q = gptq_quantize(w, H, GridSpec(4, 128), GPTQOptions())
    assert torch.all(q.weight[:, 10] == 0)


def test_damp_is_raised_until_cholesky_succeeds(caplog):
    K = 64
    H = torch.eye(K)
    H[5, 5] = -0.05      # not positive definite: 0.01, 0.02 and 0.04 of mean(diag) are too little
    w = torch.randn(32, K, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="quantizer.gptq"):
        q = gptq_quantize(w, H, GridSpec(4, 32), GPTQOptions(damp_percent=0.01), name="probe")
    assert q.damp == pytest.approx(0.08)
    assert "probe: Cholesky failed at damp 0.01; succeeded with damp 0.08" in caplog.text


def test_mse_search_never_worse_than_minmax(real_layer):
    w, _ = real_layer
    for sym in (True, False):
        plain = rtn(w, GridSpec(3, 128, sym=sym))
        mse = rtn(w, GridSpec(3, 128, sym=sym, mse=True))
        assert (mse.weight - w).pow(2).sum() < (plain.weight - w).pow(2).sum()


def test_grid_handles_a_zero_row():
    w = torch.zeros(4, 32)
    w[1] = torch.linspace(-1, 1, 32)
    for sym in (True, False):
        s, z = fit(w, GridSpec(4, 32, sym=sym))
        assert bool((s > 0).all())
        r = rtn(w, GridSpec(4, 32, sym=sym))
        assert torch.equal(r.weight[0], torch.zeros(32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_through_the_format_module(bits):
    """Random codes and zeros, K=576 (not a multiple of g=128), through the one format module."""
    gen = torch.Generator().manual_seed(bits)
    K, N, g = 576, 192, 128
    codes = torch.randint(0, 2 ** bits, (K, N), generator=gen, dtype=torch.int32)
    G = gptq_format.num_groups(K, g)
    zeros = torch.randint(1, 2 ** bits, (G, N), generator=gen, dtype=torch.int32)
    qweight = gptq_format.pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (K * bits // 32, N)
    assert torch.equal(gptq_format.unpack_qweight(qweight, bits, K), codes)
    for fmt in ("gptq", "gptq_v2"):
        qzeros = gptq_format.pack_qzeros(zeros, bits, fmt)
        assert qzeros.shape == (G, N * bits // 32)
        assert torch.equal(gptq_format.unpack_qzeros(qzeros, bits, N, fmt), zeros)


@pytest.mark.parametrize("bits,group,message", [
    (5, 128, "bits must be one of 2, 3, 4, 8"),
    (4, 0, "group size must be -1"),
    (4, -2, "group size must be -1"),
])
def test_bad_grid_settings_are_refused(bits, group, message):
    with pytest.raises(ValueError, match=message):
        GridSpec(bits=bits, group_size=group)


def test_bad_gptq_options_are_refused():
    with pytest.raises(ValueError, match="damp must be in"):
        GPTQOptions(damp_percent=0)
    with pytest.raises(ValueError, match="token clip must be > 0"):
        GPTQOptions(token_clip=-1)


def test_token_clip_caps_the_massive_token():
    x = torch.ones(8, 4)
    x[0] *= 1000.0
    plain, clipped = Hessian(4, "cpu"), Hessian(4, "cpu", token_clip=2.0)
    plain.add(x)
    clipped.add(x)
    assert plain.H[0, 0] > 1e5
    # token 0 now counts as a token of norm 2 x median (= 4): its x x^T adds 4*4/4 per entry
    expected = (2.0 / 8) * (7 * 1.0 + 4.0)
    assert clipped.H[0, 0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("spec", [GridSpec(3, 64, sym=False), GridSpec(4, 64, mse=True), GridSpec(2, -1)])
def test_rtn_fits_each_group_on_its_own_columns(spec):
    """rtn fits all groups in one call (rows of an [N * groups, g] view): each group's scale and zero
    must still be those of `fit` on that group's columns alone, the short last group included."""
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(1)) * 0.05
    r = rtn(w, spec)
    g = 200 if spec.group_size == -1 else spec.group_size
    for j, start in enumerate(range(0, 200, g)):
        s, z = fit(w[:, start:start + g], spec)
        assert torch.equal(r.scales[j], s) and torch.equal(r.zeros[j], z.to(torch.int32))
    assert torch.equal(r.weight, dequantize(r.codes.float(), r.scales[r.g_idx.long()].T, r.zeros[r.g_idx.long()].T.float()))
