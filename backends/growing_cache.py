"""A KV cache for eager decoding that writes each step into spare room instead of concatenating.

Why: transformers' DynamicCache grows every layer with `torch.cat`, which copies the whole cache at each
step. On a CPU that copy dominates long decodes: at 450 cached tokens and 32 rows of the default model it
took 47% of a step (bench/RESULTS.md). Here each layer keeps a buffer with room to spare (doubling when
full) and hands attention a view of its filled part, so a step writes only its own keys and values.
Everything else (masks, cropping, reordering) is DynamicCache's: the layers stay DynamicLayers.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_ROOM = 16  # positions a fresh buffer holds at least. Not more: a buffer holds at most twice what it must,
# where a floor of 256 gave a short chat's cache (a 40-token prompt) six times DynamicCache's memory


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of the front of larger buffers."""

    def __init__(self, most: int | None = None):
        super().__init__()
        self.most = most  # positions the model can attend to: no buffer grows past them
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _holds_view(self) -> bool:
        """Whether keys are still the front of this layer's buffer (DynamicCache's own methods, such as
        reordering rows, replace them with fresh tensors; cropping keeps a shorter front)."""
        if self._buffers is None or self.keys is None or self.keys.dim() != 4:
            return False
        buffer = self._buffers[0]
        return (self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[:2] == buffer.shape[:2]
                and self.keys.shape[-1] == buffer.shape[-1] and self.keys.stride() == buffer.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        total = length + key_states.shape[-2]
        if not self._holds_view() or total > self._buffers[0].shape[-2]:
            self._regrow(key_states, value_states, length, total)
        keys, values = self._buffers
        keys[..., length:total, :].copy_(key_states)
        values[..., length:total, :].copy_(value_states)
        self.keys, self.values = keys[..., :total, :], values[..., :total, :]
        return self.keys, self.values

    def _regrow(self, key_states, value_states, length: int, total: int) -> None:
        """New buffers with room for twice what they must hold (at most the model's positions), the cached
        positions copied over: a decode copies its cache log2(length) times, not once a step, and holds at
        most twice the memory DynamicCache would."""
        room = max(MIN_ROOM, 2 * total)
        if self.most:
            room = max(total, min(room, self.most))
        fresh = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((*new.shape[:2], room, new.shape[-1]))
            if length:
                buffer[..., :length, :].copy_(old[..., :length, :])
            fresh.append(buffer)
        self._buffers = (fresh[0], fresh[1])

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def growing_cache(model):
    """A DynamicCache for `model` whose full-attention layers grow in place, or None (the model then builds
    its own cache): for models transformers itself would not give a DynamicCache (custom caches such as
    RWKV's), and where this transformers does not build its cache's layers from a config."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    config = model.config
    try:
        cache = DynamicCache(config=config)
    except TypeError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    most = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    cache.layers = [GrowingLayer(most) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache
