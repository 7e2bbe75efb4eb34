"""The Backend contract: the only door between the UI (or CLI, or API) and an inference engine.

Every engine (transformers, bitsandbytes, llama.cpp, gptq) implements `Backend`. The small
dataclasses here are what crosses the door, so tokens/s, memory and perplexity are measured the
same way for every engine.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence


MAX_TOP_LOGPROBS = 20    # alternatives per token, as OpenAI's API allows


class BackendError(Exception):
    """A problem the user can act on (bad path, bad option, corrupt file). Its text is shown as is."""


@dataclass(frozen=True)
class OptionSpec:
    """One load option a backend accepts, described as data so the UI can build a form from it."""
    name: str
    kind: str  # "choice" | "int" | "float" | "bool" | "str"
    default: Any
    choices: tuple = ()
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared as data (devices, dtypes, bits) instead of string checks."""
    devices: tuple[str, ...]
    dtypes: tuple[str, ...] = ()
    bits: tuple[int, ...] = ()
    formats: tuple[str, ...] = ()  # "hf", "gguf", "gptq"
    options: tuple[OptionSpec, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # None: no log-probs; k: each generated token's chunk carries its log-prob and the k most likely
    # tokens of its step (GenerationChunk.scores), read from the logits it was sampled from
    logprobs: int | None = None
    # OpenAI's penalties, on the reply's tokens so far: logit -= count * frequency + (count > 0) * presence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()    # (token id, added to its logit), as OpenAI's map

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything but temperature and truncation changes the model's logits before sampling."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))

    def validated(self) -> "SamplingParams":
        """Raise BackendError on values no engine can honour (negative temperature, top_p > 1...)."""
        problems = []
        if not (0.0 <= self.temperature <= 10.0):
            problems.append(f"temperature must be in [0, 10], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 <= self.min_p < 1.0):
            problems.append(f"min_p must be in [0, 1), got {self.min_p}")
        if not (0.0 < self.repetition_penalty <= 10.0):
            problems.append(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not (1 <= self.max_new_tokens <= 1_000_000):
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        bad_bias = [(t, b) for t, b in self.logit_bias if not (-100.0 <= b <= 100.0) or t < 0]
        if bad_bias:
            problems.append(f"logit_bias values must be in [-100, 100] for token ids >= 0, got {bad_bias[0]}")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            problems.append(f"logprobs must be 0 to {MAX_TOP_LOGPROBS} alternatives, got {self.logprobs}")
        if problems:
            raise BackendError("; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        known = {f for f in cls.__dataclass_fields__}
        clean = {k: v for k, v in values.items() if k in known}
        if "seed" in clean and clean["seed"] in ("", -1, None):
            clean["seed"] = None
        if "stop" in clean:
            clean["stop"] = tuple(clean["stop"] or ())
        if clean.get("logprobs") is not None:
            clean["logprobs"] = int(clean["logprobs"])
        for name in ("top_k", "max_new_tokens"):
            if name in clean:
                clean[name] = int(clean[name])
        if "logit_bias" in clean:
            bias = clean["logit_bias"] or ()
            pairs = bias.items() if isinstance(bias, dict) else bias
            clean["logit_bias"] = tuple(sorted((int(t), float(b)) for t, b in pairs))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if name in clean:
                clean[name] = float(clean[name])
        if clean.get("seed") is not None:
            clean["seed"] = int(clean["seed"])
        return cls(**clean)


@dataclass
class GenerationChunk:
    """One step of a streamed generation. `text` is only the new text of this step."""
    text: str
    prompt_tokens: int
    generated_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos/stop string), "length", "cancelled", "unloaded"
    token_ids: tuple[int, ...] = ()   # the tokens this step produced (what log-probs are scored on)
    scores: tuple["TokenScore", ...] = ()   # with SamplingParams.logprobs: one per token_ids entry


@dataclass(frozen=True)
class TokenScore:
    """One token of a scored sequence: log p(token | the tokens before it), and the model's most
    likely tokens at that position (id, log p), best first: what an API reports as log-probs."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def drawn_first(self) -> "TokenScore":
        """The same score with the token listed first among alternatives it ties with at the top (fp16
        logits tie often on a GPU, and argmax and top-k may break a tie differently): a greedy token
        then always reads as its step's best."""
        top = self.top
        if not top or top[0][0] == self.token or top[0][1] != self.logprob:
            return self
        rest = tuple(pair for pair in top if pair[0] != self.token)
        return TokenScore(self.token, self.logprob, ((self.token, self.logprob),) + rest[:len(top) - 1])


@dataclass
class MemoryReport:
    ram_mb: float   # resident memory this model holds in the process (weights, caches), estimated
    gpu_mb: float   # GPU memory allocated for this model
    file_mb: float = 0.0
    bits_per_weight: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class Backend(abc.ABC):
    """One loaded model on one engine. Instances are not thread-safe: the ModelManager serialises
    calls with a per-model lock."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # what the user should know about this load (a relabelled checkpoint, weights left in host memory):
    # engines set their own list in load(); the Models tab shows it
    load_warnings: Sequence[str] = ()

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict | None) -> dict:
        """Fill defaults and check types/choices before any file is touched."""
        options = dict(options or {})
        known = {o.name: o for o in cls.capabilities.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise BackendError(f"{cls.name}: unknown option(s) {', '.join(unknown)}; "
                               f"known: {', '.join(known) or 'none'}")
        out = {}
        for spec in cls.capabilities.options:
            value = options.get(spec.name, spec.default)
            try:
                if value is None:
                    pass
                elif spec.kind == "int":
                    value = int(value)
                elif spec.kind == "float":
                    value = float(value)
                elif spec.kind == "bool":
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
                elif spec.kind == "str":
                    value = str(value)
            except (TypeError, ValueError):
                raise BackendError(f"{cls.name}: option {spec.name} must be {spec.kind}, got {value!r}") from None
            if spec.kind == "choice" and spec.choices and value not in spec.choices:
                raise BackendError(f"{cls.name}: option {spec.name} must be one of "
                                   f"{', '.join(map(str, spec.choices))}, got {value!r}")
            if value is not None and spec.minimum is not None and value < spec.minimum:
                raise BackendError(f"{cls.name}: option {spec.name} must be >= {spec.minimum}, got {value}")
            if value is not None and spec.maximum is not None and value > spec.maximum:
                raise BackendError(f"{cls.name}: option {spec.name} must be <= {spec.maximum}, got {value}")
            out[spec.name] = value
        return out

    @abc.abstractmethod
    def load(self, path: Path, options: dict) -> None:
        """Load the model at `path` (already confined to the models folder) with validated options."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Free every resource; the instance is unusable afterwards."""

    @abc.abstractmethod
    def memory_report(self) -> MemoryReport: ...

    # -- text ------------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """The text of `ids`; `special` writes special tokens (<|im_end|>...) out instead of dropping them."""

    @abc.abstractmethod
    def check_token_ids(self, ids: Sequence[int]) -> None:
        """Raise BackendError naming the first id outside the vocabulary (ids can come from an API
        client; engines fail on them with an index error, or abort the process)."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int: ...

    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """The model's own chat template source (tokenizer config or GGUF metadata)."""

    @abc.abstractmethod
    def special_tokens(self) -> dict:
        """{"bos_token": str|None, "eos_token": str|None} for template rendering."""

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        from backends.chat_template import render_chat
        return render_chat(self.chat_template(), messages, add_generation_prompt, **self.special_tokens())

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt: str, params: SamplingParams,
                 stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """Stream a continuation of a raw prompt (already chat-rendered when chatting)."""
        return self.generate_ids(self.tokenize(prompt, add_special=False), params, stop_event)

    @abc.abstractmethod
    def generate_ids(self, ids: Sequence[int], params: SamplingParams,
                     stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """Stream a continuation of a tokenized prompt. Checks `stop_event.is_set()` (its only use: the
        manager passes an either-of-two stop) before every token, so Stop and Unload take effect
        within one token."""

    def chat(self, messages: list[Message], params: SamplingParams,
             stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        return self.generate(self.render_chat(messages), params, stop_event)

    # -- scoring ---------------------------------------------------------------------------
    @abc.abstractmethod
    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1..len(ids)-1 (the first token is context only)."""

    @abc.abstractmethod
    def score_tokens(self, ids: Sequence[int], top: int = 0, next_token: bool = False) -> list[TokenScore]:
        """TokenScore of ids[i] for i = 1..len(ids)-1, with the `top` most likely tokens at each
        position: token_logprobs plus the alternatives, from the same single pass. `next_token` adds
        one more for the position after the last id, whose token is the most likely one (the greedy
        reply's first token, without a second pass over the prompt)."""

    @abc.abstractmethod
    def is_end_of_generation(self, token: int) -> bool:
        """Whether generating `token` ends a reply (eos, end of turn)."""
