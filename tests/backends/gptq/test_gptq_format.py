"""The on-disk GPTQ format: packing round-trips, the exact bit layouts of GPTQ_FORMAT.md, v1/v2 zeros,
configs and weight-file discovery."""
from __future__ import annotations

import json

import pytest
import torch

from backends.base import BackendError
from backends.gptq import format as fmt


def _codes(K, N, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K,N", [(96, 64), (320, 32)])
def test_qweight_round_trip(bits, K, N):
    codes = _codes(K, N, bits)
    q = fmt.pack_qweight(codes, bits)
    assert q.dtype == torch.int32 and q.shape == (K * bits // 32, N)
    assert torch.equal(fmt.unpack_qweight(q, bits, K), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_qzeros_round_trip(bits, checkpoint_format):
    G, N = 5, 64
    lo = 1 if checkpoint_format == "gptq" else 0
    zeros = torch.randint(lo, 2**bits, (G, N), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    qz = fmt.pack_qzeros(zeros, bits, checkpoint_format)
    assert qz.dtype == torch.int32 and qz.shape == (G, N * bits // 32)
    assert torch.equal(fmt.unpack_qzeros(qz, bits, N, checkpoint_format), zeros)


def test_v1_symmetric_4bit_word_is_0x77777777():
    zeros = torch.full((2, 16), 8, dtype=torch.int32)
    qz = fmt.pack_qzeros(zeros, 4, "gptq")
    assert (qz == 0x77777777).all()
    v2 = fmt.pack_qzeros(zeros, 4, "gptq_v2")
    assert (v2 == torch.tensor(0x88888888 - 2**32, dtype=torch.int32)).all()
    assert torch.equal(fmt.convert_qzeros(qz, 4, "gptq", "gptq_v2"), v2)
    # converting v1 -> v2 adds 0x11111111 to each 4-bit word
    assert int(v2[0, 0]) & 0xFFFFFFFF == (0x77777777 + 0x11111111)


def test_pack_layout_2_4_8_first_value_in_low_bits():
    codes = torch.arange(8, dtype=torch.int32).reshape(8, 1)
    assert int(fmt.pack_qweight(codes, 4)[0, 0]) == 0x76543210
    codes2 = torch.tensor([[1], [2], [3], [0]] * 4, dtype=torch.int32)
    assert int(fmt.pack_qweight(codes2, 2)[0, 0]) & 0xFFFFFFFF == int("00111001" * 4, 2)
    codes8 = torch.tensor([[0x12], [0x34], [0x56], [0x78]], dtype=torch.int32)
    assert int(fmt.pack_qweight(codes8, 8)[0, 0]) == 0x78563412


def test_pack_layout_3bit_matches_the_spec_word_by_word():
    vals = [int(v) for v in _codes(32, 1, 3, seed=7)[:, 0]]
    w0, w1, w2 = [int(x) & 0xFFFFFFFF for x in fmt.pack_qweight(torch.tensor(vals).reshape(32, 1), 3)[:, 0]]
    # word 0: values 0-9 at bits 3j; low 2 bits of value 10 at bits 30-31
    e0 = sum(vals[j] << (3 * j) for j in range(10)) | ((vals[10] & 3) << 30)
    # word 1: bit 2 of value 10 at bit 0; values 11-20 at 3(j-11)+1; bit 0 of value 21 at bit 31
    e1 = (vals[10] >> 2) | sum(vals[j] << (3 * (j - 11) + 1) for j in range(11, 21)) | ((vals[21] & 1) << 31)
    # word 2: bits 1-2 of value 21 at bits 0-1; values 22-31 at 3(j-22)+2
    e2 = (vals[21] >> 1) | sum(vals[j] << (3 * (j - 22) + 2) for j in range(22, 32))
    assert (w0, w1, w2) == (e0, e1, e2)


def test_3bit_needs_multiples_of_32():
    with pytest.raises(fmt.FormatError, match="multiple of 32"):
        fmt.pack_qweight(_codes(48, 8, 3), 3)


def test_codes_out_of_range_refused():
    with pytest.raises(fmt.FormatError, match="out of range"):
        fmt.pack_qweight(torch.full((8, 2), 16, dtype=torch.int32), 4)


def test_v1_cannot_store_zero_point_zero():
    with pytest.raises(fmt.FormatError, match="gptq_v2"):
        fmt.pack_qzeros(torch.zeros(1, 8, dtype=torch.int32), 4, "gptq")


@pytest.mark.parametrize("bits,gs", [(2, 64), (3, 32), (4, 128), (8, 128)])
def test_dequantize_matches_formula_with_short_last_group(bits, gs):
    K, N = 192 if bits != 3 else 160, 64  # 192 = 128 + 64 (short last group for g128)
    G = fmt.num_groups(K, gs)
    codes = _codes(K, N, bits, seed=3)
    zeros = torch.randint(0, 2**bits, (G, N), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    scales = (torch.rand(G, N, generator=torch.Generator().manual_seed(5)) * 0.1 + 0.01).half()
    g_idx = fmt.default_g_idx(K, gs)
    W = fmt.dequantize(fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, "gptq_v2"), scales, g_idx,
                       bits, "gptq_v2", dtype=torch.float64)
    gl = g_idx.long()
    ref = scales.double()[gl] * (codes.double() - zeros.double()[gl])
    assert W.shape == (K, N)
    assert torch.equal(W, ref)
    # older checkpoints store no g_idx: the config's group size says where the groups are
    packed = (fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, "gptq_v2"), scales, None, bits, "gptq_v2")
    assert torch.equal(fmt.dequantize(*packed, dtype=torch.float64, group_size=gs), ref)
    if G > 1:  # the scales alone do not say the size (192 in 2 groups is g128 with a short last one, not g96)
        with pytest.raises(fmt.FormatError, match="pass the config's group size"):
            fmt.dequantize(*packed)
    with pytest.raises(fmt.FormatError, match="groups of scales"):
        fmt.dequantize(*packed, group_size=32 if gs != 32 else 64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_and_v2_of_same_checkpoint_give_identical_weights(bits):
    K, N, gs = 128, 64, 32
    G = K // gs
    codes = _codes(K, N, bits, seed=11)
    zeros = torch.randint(1, 2**bits, (G, N), generator=torch.Generator().manual_seed(12), dtype=torch.int32)
    scales = torch.rand(G, N, generator=torch.Generator().manual_seed(13)).half()
    g_idx = torch.randperm(K, generator=torch.Generator().manual_seed(14)).to(torch.int32) // gs  # act-order
    qw = fmt.pack_qweight(codes, bits)
    v1 = fmt.pack_qzeros(zeros, bits, "gptq")
    v2 = fmt.convert_qzeros(v1, bits, "gptq", "gptq_v2")
    assert not torch.equal(v1, v2)
    w1 = fmt.dequantize(qw, v1, scales, g_idx, bits, "gptq")
    w2 = fmt.dequantize(qw, v2, scales, g_idx, bits, "gptq_v2")
    assert torch.equal(w1, w2)
    assert torch.equal(fmt.convert_qzeros(v2, bits, "gptq_v2", "gptq"), v1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_check_catches_mislabeled_v2(bits):
    mid = torch.full((3, 32), 2 ** (bits - 1), dtype=torch.int32)
    stored_v2 = fmt.pack_qzeros(mid, bits, "gptq_v2")
    stored_v1 = fmt.pack_qzeros(mid, bits, "gptq")
    assert fmt.symmetric_zero_format(stored_v1, bits) == "gptq"
    assert fmt.symmetric_zero_format(stored_v2, bits) == "gptq_v2"
    # labelled v1 but stored as v2: caught
    cfg = fmt.QuantizeConfig(bits=bits, group_size=32, sym=True, checkpoint_format="gptq")
    used, warning = fmt.resolve_checkpoint_format(cfg, stored_v2)
    assert used == "gptq_v2" and "gptq_v2" in warning
    # correct labels pass silently
    assert fmt.resolve_checkpoint_format(cfg, stored_v1) == ("gptq", None)
    # asymmetric checkpoints: the label is trusted
    asym = fmt.QuantizeConfig(bits=bits, group_size=32, sym=False, checkpoint_format="gptq")
    assert fmt.resolve_checkpoint_format(asym, stored_v2) == ("gptq", None)


def test_quantize_config_round_trip_and_validation(tmp_path):
    cfg = fmt.QuantizeConfig(bits=3, group_size=64, desc_act=True, sym=False, checkpoint_format="gptq_v2",
                             meta={"quantizer": ["gptq-webui:0.1"]})
    d = cfg.to_dict()
    assert d["quant_method"] == "gptq" and d["bits"] == 3 and d["meta"]["quantizer"] == ["gptq-webui:0.1"]
    assert fmt.QuantizeConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(fmt.FormatError, match="bits must be one of 2, 3, 4, 8"):
        fmt.QuantizeConfig(bits=5)
    with pytest.raises(BackendError, match="not GPTQ"):
        fmt.QuantizeConfig.from_dict({"bits": 4, "quant_method": "awq"})
    with pytest.raises(ValueError, match="checkpoint_format"):
        fmt.QuantizeConfig.from_dict({"bits": 4, "checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match="group_size"):
        fmt.QuantizeConfig(group_size=0)
    # newer GPTQModel field names, older tools without a format (v1), other pack dtypes refused
    new = fmt.QuantizeConfig.from_dict({"bits": 2, "group_size": 64, "sym": False, "method": "gptq",
                                        "format": "gptq_v2", "pack_dtype": "int32"})
    assert new.checkpoint_format == "gptq_v2" and not new.sym
    assert fmt.QuantizeConfig.from_dict({"bits": 4, "group_size": 128}).checkpoint_format == "gptq"
    with pytest.raises(fmt.FormatError, match="int16"):
        fmt.QuantizeConfig.from_dict({"bits": 4, "pack_dtype": "int16"})


def test_read_write_quantize_config(tmp_path):
    cfg = fmt.QuantizeConfig(bits=4, group_size=128)
    fmt.write_quantize_config(tmp_path, cfg, {"model_type": "llama", "hidden_size": 8})
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert fmt.read_quantize_config(tmp_path) == cfg
    # only config.json's quantization_config (optimum / transformers style)
    (tmp_path / "quantize_config.json").unlink()
    assert fmt.read_quantize_config(tmp_path).bits == 4
    # older tools: quant_config.json wins over config.json
    (tmp_path / "quant_config.json").write_text(json.dumps({"bits": 2, "group_size": 64, "sym": True}))
    assert fmt.read_quantize_config(tmp_path).bits == 2
    with pytest.raises(fmt.FormatError, match="no GPTQ quantize config"):
        fmt.read_quantize_config(tmp_path / "missing")


def test_find_weight_files(tmp_path):
    from safetensors.torch import save_file
    cfg = fmt.QuantizeConfig(bits=4, group_size=128)
    with pytest.raises(fmt.FormatError, match="no weight file"):
        fmt.find_weight_files(tmp_path, cfg)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(fmt.FormatError, match="safetensors only"):
        fmt.find_weight_files(tmp_path, cfg)
    t = {"a": torch.zeros(1)}
    save_file(t, tmp_path / "gptq_model-4bit-128g.safetensors")
    assert [p.name for p in fmt.find_weight_files(tmp_path, cfg)] == ["gptq_model-4bit-128g.safetensors"]
    cfg2 = fmt.QuantizeConfig(bits=4, group_size=128, model_file_base_name="custom")
    save_file(t, tmp_path / "custom.safetensors")
    assert [p.name for p in fmt.find_weight_files(tmp_path, cfg2)] == ["custom.safetensors"]
    save_file(t, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert [p.name for p in fmt.find_weight_files(tmp_path, cfg)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(t, tmp_path / "model.safetensors")
    assert [p.name for p in fmt.find_weight_files(tmp_path, cfg)] == ["model.safetensors"]


@pytest.mark.parametrize("base,config_names_it", [("gptq_model-4bit-128g", False), ("custom", True),
                                                  ("anything", False)])
def test_shards_indexed_under_the_base_name(tmp_path, base, config_names_it):
    """AutoGPTQ and GPTQModel shard as <base>-0000i-of-0000n.safetensors with <base>.safetensors.index.json
    (the base name AutoGPTQ's gptq_model-{b}bit-{g}g, or model_file_base_name); a lone index of any name is
    read too. A shard the index names but the folder lacks is an error, not a model with missing layers."""
    from safetensors.torch import save_file
    cfg = fmt.QuantizeConfig(bits=4, group_size=128, model_file_base_name=base if config_names_it else None)
    shards = [f"{base}-0000{i}-of-00002.safetensors" for i in (1, 2)]
    save_file({"a": torch.zeros(1)}, tmp_path / shards[0])
    save_file({"b": torch.zeros(1)}, tmp_path / shards[1])
    index = tmp_path / f"{base}.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    assert [p.name for p in fmt.find_weight_files(tmp_path, cfg)] == shards
    (tmp_path / shards[1]).unlink()
    with pytest.raises(fmt.FormatError, match="not in"):
        fmt.find_weight_files(tmp_path, cfg)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_interleaved_words_hold_the_same_values(bits):
    """The kernel layout keeps every value of a word, moved to the pair order the half2 kernels (and, at 8
    bits, mode 8: bytes 0-3 hold values 0, 2, 1, 3) read."""
    from backends.gptq.word_order import interleave_pairs
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (96, 24), generator=gen, dtype=torch.int32)
    words = interleave_pairs(fmt.pack_qweight(codes, bits), bits).long() & 0xFFFFFFFF
    per_word = 32 // bits
    slots = [(words >> ((j % 2) * 16 + (j // 2) * bits)) & (2 ** bits - 1) for j in range(per_word)]
    assert torch.equal(torch.stack(slots, 1).reshape(-1, 24).int(), codes)
    if bits == 8:
        assert [int(words[0, 0]) >> (8 * b) & 255 for b in range(4)] == [int(codes[j, 0]) for j in (0, 2, 1, 3)]
    with pytest.raises(ValueError):
        interleave_pairs(fmt.pack_qweight(codes[:, :], 4), 5)


def test_3bit_planes_hold_the_same_values():
    """3-bit blocks split into two 2-bit pair-order words and a word of third bits keep every value."""
    from backends.gptq.word_order import hi_plane_bit, interleave_pairs
    codes = torch.randint(0, 8, (96, 24), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    words = (interleave_pairs(fmt.pack_qweight(codes, 3), 3).long() & 0xFFFFFFFF).view(3, 3, 24)  # [block, word, N]
    assert sorted(hi_plane_bit(j) for j in range(32)) == list(range(32))  # every bit of the word used once
    for j in range(32):
        i = j % 16
        lo = (words[:, j // 16] >> ((i % 2) * 16 + (i // 2) * 2)) & 3
        hi = (words[:, 2] >> hi_plane_bit(j)) & 1
        assert torch.equal((lo | hi << 2).int(), codes[j::32]), j


def test_runtime_can_be_limited_to_some_kernel_modes():
    """bench.kernels --modes: only the named unpacking modes are tried; none left means dequantize."""
    from backends.gptq.kernel_runtime import KernelRuntime
    from backends.gptq.quant_linear import make_kernel_layer
    codes = torch.randint(0, 16, (256, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    zeros = torch.full((2, 64), 8, dtype=torch.int32)
    layer = make_kernel_layer(fmt.pack_qweight(codes, 4), fmt.pack_qzeros(zeros, 4, "gptq"),
                              torch.full((2, 64), 0.01, dtype=torch.float16), None, 4, 128, "gptq", "cpu")
    every = {c.mode for c in KernelRuntime().candidates(1, layer) if c.path == "fused"}
    assert every == {0, 2, 3, 4}
    only = KernelRuntime(modes=(4,)).candidates(1, layer)
    assert only and {(c.path, c.mode) for c in only} == {("fused", 4)}
    assert [c.path for c in KernelRuntime(modes=(1,)).candidates(1, layer)] == ["dequant"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tuner_keeps_one_fallback_per_mode_beside_the_tensor_core_kernel(bits):
    """From 2 to 64 rows the tensor-core kernel (mode 5) leads with its grid of launch parameters; the
    other modes keep one config each (a fallback), and one row keeps every mode's grid."""
    from backends.gptq.kernel_runtime import KernelRuntime, gluon_kernels_available
    from backends.gptq.quant_linear import make_kernel_layer
    K, N = 512, 256
    codes = torch.randint(0, 2**bits, (K, N), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    zeros = torch.full((K // 128, N), 1, dtype=torch.int32)
    layer = make_kernel_layer(fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, "gptq"),
                              torch.full((K // 128, N), 0.01, dtype=torch.float16), None, bits, 128, "gptq", "cpu")
    for M in (16, 64):
        fused = [c for c in KernelRuntime().candidates(M, layer) if c.path == "fused"]
        per_mode = {m: sum(c.mode == m for c in fused) for m in {c.mode for c in fused}}
        assert fused[0].mode == 5 and per_mode[5] > 4, per_mode
        assert len(per_mode) > 1 and all(n == 1 for m, n in per_mode.items() if m not in (5, 7, 8)), per_mode
        # the Gluon kernel (mode 7): 4-bit, up to 16 rows, its own grid; never without Gluon
        assert (7 in per_mode) == (bits == 4 and M == 16 and gluon_kernels_available()), per_mode
    one_row = [c for c in KernelRuntime().candidates(1, layer) if c.path == "fused"]
    assert sum(c.mode == 4 for c in one_row) > 4 and sum(c.mode == 0 for c in one_row) > 1


def test_tuner_copies_enough_weights_to_time_them_cold():
    """The tuner times over copies that together exceed twice the L2 (a decoding step reads weights
    from memory, not cache), within a quarter of free memory; none off CUDA."""
    from backends.gptq.kernel_runtime import KernelLayer
    from backends.gptq.timing import cold_copies
    layer = KernelLayer(qweight=torch.zeros(64, 256, dtype=torch.int32), scales=torch.ones(4, 256).half(),
                        zeros=torch.zeros(4, 256, dtype=torch.uint8), perm=torch.arange(512, dtype=torch.int32),
                        bits=4, K=512, N=256, group_size=128)
    size = layer.nbytes()
    assert cold_copies(layer, "cpu") == [layer]
    copies = cold_copies(layer, "cpu", l2_bytes=5 * size, free_bytes=10**9)
    assert len(copies) == 10 and copies[0] is layer
    assert len({c.qweight.data_ptr() for c in copies}) == 10  # distinct memory, same values
    assert all(torch.equal(c.qweight, layer.qweight) and torch.equal(c.perm, layer.perm) for c in copies)
    assert len(cold_copies(layer, "cpu", l2_bytes=5 * size, free_bytes=12 * size)) == 3  # memory-bound
    assert len(cold_copies(layer, "cpu", l2_bytes=10**12, free_bytes=10**15)) == 16  # capped
