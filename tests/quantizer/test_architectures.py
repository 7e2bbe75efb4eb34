"""The other LLaMA-family layouts the quantizer supports (Qwen2 with q/k/v biases, Mistral), on small
randomly initialised models with the default model's tokenizer: the pipeline runs, biases are kept,
and the dequantized checkpoint computes what the quantized layers computed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from quantizer.pipeline import plan, run
from quantizer.reference import DequantizedGPTQBackend
from quantizer.settings import QuantizeSettings


def _make(kind: str, folder, tokenizer_src):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_src / name, folder / name)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_architectures_quantize(kind, tmp_path, default_hf_model):
    _make(kind, tmp_path / "src", default_hf_model)
    seen = {}
    result = run(plan(tmp_path, "src", "out", QuantizeSettings(nsamples=2, seqlen=32, group_size=32)),
                 on_module=lambda n, q: seen.__setitem__(n, q.weight))
    assert json.loads((result.output / "config.json").read_text())["model_type"] == kind
    with safe_open(str(result.output / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.1.mlp.down_proj.qweight" in keys and "lm_head.weight" in keys
    if kind == "qwen2":
        assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= keys
    backend = DequantizedGPTQBackend()
    backend.load(result.output, backend.validate_options({"dtype": "float32", "device": "cpu"}))
    for name, fake in seen.items():
        got = backend.model.get_submodule(name).weight
        assert torch.equal(got, fake), name
    assert len(backend.token_logprobs(list(range(10, 30)))) == 19
    backend.unload()
