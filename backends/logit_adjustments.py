"""What the sampling settings do to a model's logits before temperature and truncation, the same on
every engine (torch's loop and llama.cpp's logits processor both call it): the logit bias, the
repetition penalty over the prompt's and the reply's tokens (HF's and vLLM's; llama.cpp's own counts
only its last 64 sampled tokens) and OpenAI's presence and frequency penalties over the reply's."""
from __future__ import annotations

from typing import Sequence

import torch

from backends.base import SamplingParams


class LogitAdjustments:
    """One reply's adjustments: apply(row) to each step's float CPU logits, accept(token) after each
    token is picked."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.params = params
        self.active = params.adjusts_logits
        self._prompt = list(prompt_ids)
        self._counts: torch.Tensor | None = None     # per vocabulary entry: times in the reply so far
        self._seen: torch.Tensor | None = None       # in the prompt or the reply
        if params.logit_bias:
            self._bias_ids = torch.tensor([t for t, _ in params.logit_bias])
            self._bias = torch.tensor([b for _, b in params.logit_bias])

    def apply(self, row: torch.Tensor) -> torch.Tensor:
        """The adjusted row, in place (a 1-D float tensor over the vocabulary)."""
        if not self.active:
            return row
        params = self.params
        if self._counts is None:                     # sized by the logits: lm_head may pad the vocabulary
            self._counts = torch.zeros(row.numel(), dtype=row.dtype)
            self._seen = torch.zeros(row.numel(), dtype=torch.bool)
            self._seen[torch.tensor(self._prompt, dtype=torch.long)] = True
        if params.logit_bias:
            row.index_add_(0, self._bias_ids, self._bias.to(row.dtype))
        if params.repetition_penalty != 1.0:         # CTRL's: divide positive logits, multiply negative ones
            picked = row[self._seen]
            row[self._seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                          picked * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            row -= self._counts * params.frequency_penalty + (self._counts > 0) * params.presence_penalty
        return row

    def accept(self, token: int) -> None:
        if self.active and self._counts is not None:
            self._counts[token] += 1
            self._seen[token] = True
