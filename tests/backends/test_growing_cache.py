"""The growing KV cache (backends.growing_cache) decodes exactly as transformers' DynamicCache, writes each
step in place between regrowths, and stays right after DynamicCache's own edits (crop, row selection,
reset), which replace or shorten its tensors."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from backends import growing_cache
from backends.growing_cache import GrowingLayer
from backends.torch_generation import _default_forward


def _step(model):
    """The engines' step over the cache it is given (None: the model's own), last position's logits."""
    forward = _default_forward(model, grow_in_place=False)

    def step(ids, cache):
        logits, cache = forward(ids, cache)
        return logits[:, -1].float(), cache
    return step


def _decode(model, cache, prompt: torch.Tensor, tokens: torch.Tensor, inspect=None):
    """Logits of the prompt's last position and of each fed token (teacher forcing: both caches see the
    same inputs), with `inspect(cache)` after every step."""
    step = _step(model)
    with torch.inference_mode():
        logits, cache = step(prompt, cache)
        out = [logits]
        for t in range(tokens.shape[1]):
            logits, cache = step(tokens[:, t:t + 1], cache)
            out.append(logits)
            if inspect:
                inspect(cache)
    return torch.stack(out), cache


def test_decoding_matches_the_dynamic_cache_across_regrowths(tiny_llama):
    torch.manual_seed(1)
    prompt = torch.randint(0, 320, (2, 100))
    tokens = torch.randint(0, 320, (2, 200))  # 100 + 200 positions: past the first buffer's 200
    moves = []

    def watch(cache):
        layer = cache.layers[0]
        moves.append((layer.keys.shape[-2], layer.keys.data_ptr()))

    cache = growing_cache.growing_cache(tiny_llama)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    grown, cache = _decode(tiny_llama, cache, prompt, tokens, watch)
    plain, plain_cache = _decode(tiny_llama, None, prompt, tokens)
    assert type(plain_cache.layers[0]) is not GrowingLayer
    assert torch.equal(grown, plain), (grown - plain).abs().max()
    assert cache.get_seq_length() == plain_cache.get_seq_length() == 300
    addresses = [ptr for _, ptr in moves]
    # twice the prompt's 100 positions first, then twice what is needed at the first overflow: the cache
    # moved once in 200 steps, at the step that filled position 201, into room for 402
    assert len(set(addresses)) == 2 and addresses.index(addresses[-1]) == 200 - 100
    assert cache.layers[0]._buffers[0].shape[-2] == 402


def test_the_room_never_exceeds_the_models_positions(tiny_llama):
    cache = growing_cache.growing_cache(tiny_llama)
    with torch.inference_mode():
        _step(tiny_llama)(torch.randint(0, 320, (1, 300)), cache)
    assert cache.layers[0]._buffers[0].shape[-2] == 512  # not 600: the model has 512 positions


def test_crop_row_selection_and_reset_keep_it_right(tiny_llama):
    torch.manual_seed(2)
    prompt = torch.randint(0, 320, (3, 40))
    more = torch.randint(0, 320, (3, 6))
    step = _step(tiny_llama)
    with torch.inference_mode():
        caches = {}
        for name, cache in (("grow", growing_cache.growing_cache(tiny_llama)), ("plain", DynamicCache())):
            _, cache = step(prompt, cache)
            cache.crop(-5)                         # a shorter front of the same buffer
            a, cache = step(more[:, :2], cache)
            cache.batch_select_indices(torch.tensor([2, 0]))  # fresh tensors: the buffer is rebuilt from them
            b, cache = step(more[[2, 0], 2:4], cache)
            cache.reset()                          # emptied (5.2x) or zeroed in place (5.17): as DynamicCache does
            c, cache = step(more[:2, 4:], cache)
            caches[name] = (a, b, c, cache.get_seq_length())
    for got, want in zip(caches["grow"], caches["plain"]):
        if isinstance(got, torch.Tensor):
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        else:
            assert got == want


def test_models_with_their_own_cache_keep_it(tiny_llama):
    """transformers gives some models a cache of their own (RWKV, xLSTM...): for those, no DynamicCache is
    forced on them; the step passes no cache and the model builds its own."""
    tiny_llama._supports_default_dynamic_cache = lambda: False
    assert growing_cache.growing_cache(tiny_llama) is None
    with torch.inference_mode():
        _, cache = _default_forward(tiny_llama)(torch.tensor([[5, 17, 42]]), None)
    assert cache is not None and not any(type(layer) is GrowingLayer for layer in cache.layers)
