"""The decoding step's compiled norms, rotary and MLP activation (backends/gptq/cuda_graph.py), run here on CPU through
`device_types=("cpu",)`: the same torch.compile path CUDA takes, checked against the eager model."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from backends import torch_generation
from backends.gptq.cuda_graph import fuse_gated_activation, fuse_norms, fuse_rotary


@pytest.fixture
def llama_and_module(tiny_llama, monkeypatch):
    model = tiny_llama
    module = sys.modules[type(model).__module__]
    # fuse_rotary wraps the modeling module's function for the whole process: restore it afterwards
    monkeypatch.setattr(module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb)
    return model, module


def _decode_logits(model, prompt, steps):
    return torch_generation.greedy_logits(torch_generation._default_forward(model), prompt, steps)


def test_compiled_norms_and_rotary_decode_like_the_eager_model(llama_and_module):
    model, module = llama_and_module
    original = module.apply_rotary_pos_emb
    prompt = [5, 17, 42, 7, 99, 3]
    reference = _decode_logits(model, prompt, 4)

    fused = copy.deepcopy(model)
    assert fuse_norms(fused, device_types=("cpu",)) == 2 * 2 + 1  # two per layer and the final norm
    assert fuse_rotary(fused, device_types=("cpu",))
    wrapper = module.apply_rotary_pos_emb
    assert wrapper is not original and wrapper.__wrapped__ is original
    assert fuse_rotary(fused, device_types=("cpu",)) and module.apply_rotary_pos_emb is wrapper  # wrapped once
    assert fuse_gated_activation(fused, device_types=("cpu",)) == 2  # one per layer

    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    with torch.inference_mode():
        fused(input_ids=torch.tensor([prompt]))
    assert counters["stats"]["unique_graphs"] == 0  # a prompt stays eager: no compile per prompt length
    got = _decode_logits(fused, prompt, 4)
    # norm, rotary and silu(gate) * up really compiled
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    assert float((got - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


def test_prompts_and_other_devices_keep_the_eager_functions(llama_and_module):
    model, module = llama_and_module
    original = module.apply_rotary_pos_emb
    assert fuse_rotary(model)  # default: CUDA only
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16)
    cos, sin = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    assert all(torch.equal(a, b) for a, b in zip(module.apply_rotary_pos_emb(q, k, cos, sin),
                                                  original(q, k, cos, sin)))
    assert fuse_norms(model) == 5
    assert fuse_gated_activation(model) == 2
    model(input_ids=torch.tensor([[1, 2, 3]]))  # a prompt on CPU
    assert counters["stats"]["unique_graphs"] == 0  # nothing was compiled for CPU tensors
    # a second call adds its device types to the one wrapper
    wrapper = module.apply_rotary_pos_emb
    assert fuse_rotary(model, device_types=("cpu",)) and module.apply_rotary_pos_emb is wrapper
    got = module.apply_rotary_pos_emb(q, k, cos, sin)
    assert counters["stats"]["unique_graphs"] == 1
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, original(q, k, cos, sin)))
