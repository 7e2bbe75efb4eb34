"""The CPU decoder (backends/gptq/cpu_decoder.py): LLaMA-family layers written out over a static KV cache must
give the HF forward's logits, for every architecture it takes, fused or not, and leave everything else to
the HF forward."""
from __future__ import annotations

import shutil

import pytest
import torch

from backends.base import BackendError, SamplingParams
from backends.gptq import cpu_int4, rtn
from backends.gptq.cpu_decoder import CpuDecoder, unsupported
from backends.registry import create_backend
from backends.torch_generation import _default_forward, greedy_logits

PROMPT = [1, 504, 3458, 282, 4649, 314, 28, 1567, 260, 1115, 30]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def _load(path, **options):
    backend = create_backend("gptq")
    backend.load(path, backend.validate_options({"device": "cpu", "dtype": "float32", **options}))
    return backend


def _assert_same_logits(model, decoder, steps=12, extra=(7, 8, 9)):
    """Prompt, greedy steps fed the HF path's own tokens, then a 3-token step past the prompt (the causal
    mask of a block that does not start at 0), against HF's forward with its dynamic cache."""
    with torch.inference_mode():
        ref = greedy_logits(_default_forward(model), PROMPT, steps, extra=extra)
        tokens = ref[:-2].argmax(-1).tolist()
        got = greedy_logits(decoder.step, PROMPT, steps, extra=extra, tokens=tokens)
        ref = greedy_logits(_default_forward(model), PROMPT, steps, extra=extra, tokens=tokens)
    assert torch.isfinite(got).all()
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cpu-decoder")


@pytest.fixture(scope="module")
def default_actorder(ckpt_dir, default_hf_model):
    return rtn.quantize_folder(default_hf_model, ckpt_dir / "smol-4bit-ao", bits=4, group_size=128, desc_act=True)


def test_default_model_decodes_as_the_hf_forward_with_fused_int4_calls(default_actorder):
    backend = _load(default_actorder)
    try:
        decoder = CpuDecoder(backend.model, 64)
        assert all(l.qkv is not None and l.gate_up is not None for l in decoder.layers)  # 576 + 192 + 192
        assert all(l.qkv.perm is not None for l in decoder.layers)  # act-order: one gather for q, k and v
        _assert_same_logits(backend.model, decoder)
        # the siblings hold views of the fused bytes: fusing costs no RAM
        attn = backend.model.model.layers[0].self_attn
        fused = decoder.layers[0].qkv.packed
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.int4.packed.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    finally:
        backend.unload()


def test_the_backend_chats_the_same_text_through_it(default_actorder):
    backend = _load(default_actorder)
    try:
        params = SamplingParams(max_new_tokens=24)
        fast = "".join(c.text for c in backend.chat(STORY, params))
        assert backend._decoder is not None and backend._decoder.max_len == 256
        backend.options["cpu_decoder"] = False
        slow = "".join(c.text for c in backend.chat(STORY, params))
        assert fast == slow and len(fast) > 40
        backend.options["cpu_decoder"] = True
        # a longer answer than the cache holds grows it, the fused weights kept
        layers = backend._decoder.layers
        longer = "".join(c.text for c in backend.chat(STORY, SamplingParams(max_new_tokens=300)))
        assert backend._decoder.max_len == 512 and backend._decoder.layers is layers
        assert longer.startswith(fast[:40])
    finally:
        backend.unload()


def _tiny(ckpt_dir, default_hf_model, name, config):
    """A random tiny model of one architecture, quantized (RTN 4-bit g32, act-order) and loaded on CPU."""
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).half()
    with torch.no_grad():  # HF initialises biases to zero; make them count
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(0, 0.1)
    folder = ckpt_dir / f"{name}-fp16"
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_hf_model / file, folder / file)
    return _load(rtn.quantize_folder(folder, ckpt_dir / f"{name}-4bit", bits=4, group_size=32, desc_act=True))


SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=49152, max_position_embeddings=512)


@pytest.mark.parametrize("name, extra, fused", [
    ("LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False), True),
    ("LlamaForCausalLM", dict(num_key_value_heads=1), False),  # k and v 32 columns wide: three calls
    ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None), True),
    ("Qwen2ForCausalLM", dict(num_key_value_heads=2), True),  # biases on q, k and v
    ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32), True),  # q and k normed per head
])
def test_each_architecture_it_takes_decodes_as_the_hf_forward(ckpt_dir, default_hf_model, name, extra, fused):
    import transformers
    config = getattr(transformers, name.replace("ForCausalLM", "Config"))(**SIZES, **extra)
    backend = _tiny(ckpt_dir, default_hf_model, name, config)
    try:
        assert unsupported(backend.model, 64) is None
        decoder = CpuDecoder(backend.model, 64)
        assert all((l.qkv is not None) == fused for l in decoder.layers)
        _assert_same_logits(backend.model, decoder)
    finally:
        backend.unload()


def test_a_sliding_window_shorter_than_the_cache_stays_on_the_hf_forward(ckpt_dir, default_hf_model):
    from transformers import MistralConfig
    backend = _tiny(ckpt_dir, default_hf_model, "MistralForCausalLM",
                    MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=128))
    try:
        assert unsupported(backend.model, 128) is None
        assert "sliding" in unsupported(backend.model, 256)
        text = list(backend.chat(STORY, SamplingParams(max_new_tokens=4)))  # cache of 256: the HF forward
        assert text[-1].finished and backend._decoder is None
    finally:
        backend.unload()


def test_fused_int4_weights_compute_the_siblings_columns(default_actorder):
    backend = _load(default_actorder)
    try:
        mlp = backend.model.model.layers[1].mlp
        gate, up = mlp.gate_proj.int4, mlp.up_proj.int4
        x = torch.randn(3, 576)
        alone = torch.cat([gate.matmul(x), up.matmul(x)], 1)
        fused = cpu_int4.fuse([gate, up])
        assert torch.equal(fused.matmul(x), alone)
        x = torch.randn(cpu_int4.DEQUANTIZE_ROWS, 576)  # prompts: the exactly dequantized runs
        assert torch.allclose(fused.matmul(x), torch.cat([gate.matmul(x), up.matmul(x)], 1), atol=1e-4)
        assert torch.equal(fused.dense(), torch.cat([gate.dense(), up.dense()]))
        down = mlp.down_proj.int4
        assert cpu_int4.fuse([gate, down]) is None  # K differs
        attn = backend.model.model.layers[1].self_attn
        assert cpu_int4.fuse([attn.q_proj.int4, gate]) is None  # another layer's perm
    finally:
        backend.unload()


def test_a_model_it_does_not_write_out_is_named(tiny_llama):
    assert unsupported(tiny_llama, 64) is None
    tiny_llama.model.layers[0].__class__ = type("GemmaDecoderLayer", (type(tiny_llama.model.layers[0]),), {})
    assert "GemmaDecoderLayer" in unsupported(tiny_llama, 64)
    assert "not a LLaMA-style" in unsupported(torch.nn.Linear(2, 2), 64)
    tiny_llama.model.layers[0].__class__ = type("LlamaDecoderLayer", (torch.nn.Module,), {})
    del tiny_llama.model.layers[1].self_attn.scaling  # a transformers that names it otherwise
    assert unsupported(tiny_llama, 64) == "LlamaAttention has no scaling"
    del tiny_llama.model.layers[1].mlp
    with pytest.raises(BackendError, match="has no mlp"):  # checked before any part is read or fused
        CpuDecoder(tiny_llama, 64)


def test_bf16_activations_decode_as_the_hf_forward(default_actorder):
    """Below fp32 the norms run as the model's own modules (torch's rms_norm rounds otherwise)."""
    backend = _load(default_actorder, dtype="bfloat16")
    try:
        decoder = CpuDecoder(backend.model, 64)
        assert decoder.keys.dtype == torch.bfloat16
        _assert_same_logits(backend.model, decoder, steps=6)
    finally:
        backend.unload()
