"""The decoding step's compiled norms, rotary and MLP activation (backends/gptq/cuda_graph.py), run here on CPU through
`device_types=("cpu",)`: the same torch.compile path CUDA takes, checked against the eager model."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from backends import torch_generation
from backends.gptq.cuda_graph import fuse_gated_activation, fuse_norms, fuse_residual_norms, fuse_rotary


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


def test_residual_adds_fused_into_the_norms_decode_like_the_eager_model(tiny_llama):
    model = tiny_llama
    prompt = [5, 17, 42, 7, 99, 3]
    reference = _decode_logits(model, prompt, 4)
    fused = copy.deepcopy(model)
    assert fuse_norms(fused, device_types=("cpu",)) == 5
    assert fuse_residual_norms(fused, device_types=("cpu",)) == 2  # both layers
    routed = fused.model.layers[0].forward
    assert fuse_residual_norms(fused, device_types=("cpu",)) == 2 and fused.model.layers[0].forward is routed  # once
    # count the norm modules' own calls: the fused path computes every norm but the first layer's
    # input norm inside the add kernels, so none of the others may run while decoding
    calls = {}
    layers = fused.model.layers
    norms = {"input0": layers[0].input_layernorm, "input1": layers[1].input_layernorm,
             "post0": layers[0].post_attention_layernorm, "post1": layers[1].post_attention_layernorm}
    for name, norm in norms.items():
        norm.register_forward_hook(lambda *_, _n=name: calls.__setitem__(_n, calls.get(_n, 0) + 1))
    final_calls = []
    inner_final = fused.model.norm.forward.__wrapped__
    fused.model.norm.forward.__defaults__ = ((lambda x: final_calls.append(1) or inner_final(x)),)
    with torch.inference_mode():
        fused(input_ids=torch.tensor([prompt]))  # a prompt: the layers' own forward, every norm runs
    assert calls == {"input0": 1, "input1": 1, "post0": 1, "post1": 1} and final_calls == [1]
    calls.clear(), final_calls.clear()
    torch._dynamo.reset()
    got = _decode_logits(fused, prompt, 4)  # a prompt, then 4 one-token steps
    assert calls == {"input0": 5, "input1": 1, "post0": 1, "post1": 1} and final_calls == [1]
    assert float((got - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


def test_residual_fusion_leaves_unknown_layers_alone(tiny_llama):
    class OtherLayer(torch.nn.Module):
        pass
    tiny_llama.model.layers.append(OtherLayer())
    assert fuse_residual_norms(tiny_llama, device_types=("cpu",)) == 0
    assert "forward" not in vars(tiny_llama.model.layers[0])  # the class forward, not routed


@pytest.mark.parametrize("arch", ["Mistral", "Qwen2", "Qwen3"])
def test_residual_fusion_on_the_other_pre_norm_architectures(arch):
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=512, head_dim=16)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    prompt = [5, 17, 42, 7, 99, 3]
    reference = _decode_logits(model, prompt, 4)
    assert fuse_residual_norms(model, device_types=("cpu",)) == 2
    calls = []
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda *_: calls.append(1))
    torch._dynamo.reset()
    got = _decode_logits(model, prompt, 4)
    assert len(calls) == 1  # the prompt's; the one-token steps normalised inside the fused add
    assert float((got - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(got.argmax(-1), reference.argmax(-1))
