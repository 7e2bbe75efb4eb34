"""One-token decoding replayed from a CUDA graph over a static KV cache.

Why: at batch 1 a 7B decoder step is ~250 small kernel launches whose Python and launch overhead
(milliseconds) dwarfs the weight read (~5 ms for fp16, ~1.3 ms at 4 bits). Capturing the step once and
replaying it removes that overhead; the static cache keeps every tensor address fixed, as a graph needs.
The step follows torch_generation's protocol: step(input_ids, cache) -> (logits, cache).
"""
from __future__ import annotations

import functools
import logging

import torch

from backends.base import BackendError
from backends.gptq import act_order, norm_kernel
from backends.gptq.kernel_runtime import disagreement

log = logging.getLogger(__name__)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm (fp32 statistics), written as one function so torch.compile fuses it into a
    single kernel shared by every norm of the model (the eager module launches about six)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _decoding(x: torch.Tensor, device_types) -> bool:
    """One token per sequence on a compiled device type: the shape the graph replays. Prompts (any
    length) stay eager, so a new prompt length never waits for a compile."""
    return x.device.type in device_types and x.dim() >= 2 and x.shape[-2] == 1


def fuse_norms(model, device_types=("cuda",)) -> int:
    """Route every RMSNorm-like module (a 1-D weight and a variance_epsilon) through one compiled
    kernel when decoding. Returns how many were routed; 0 when torch.compile is unavailable."""
    try:
        compiled = torch.compile(_rms_norm, dynamic=False)
    except Exception as exc:  # no compiler toolchain: keep the eager modules
        log.warning("torch.compile unavailable, norms stay eager: %s", exc)
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, float):
            module.forward = (lambda w, e: (lambda x: compiled(x, w, e) if _decoding(x, device_types)
                                            else _rms_norm(x, w, e)))(weight, eps)
            count += 1
    return count


def fuse_rotary(model, device_types=("cuda",)) -> bool:
    """Route the rotary embedding of the model's HF modeling module through one compiled kernel when
    decoding. Why: eager rotary is ~12 launches per layer (mul, neg, cat, add for q and k), 0.7 ms of a
    3.9 ms 7B decoding step on an H100 (bench/RESULTS.md, "Decoding step profile"). HF attention calls
    the module-level `apply_rotary_pos_emb`, so that name is wrapped in place, once per process (a later
    call only adds its device types); the wrapper falls back to the original for other devices and for
    prompts, so other models of the same architecture compute as before. Returns whether it is routed."""
    import sys
    module = sys.modules.get(type(model).__module__)
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None or not callable(current):
        return False
    compiled_on = getattr(current, "compiled_device_types", None)
    if compiled_on is not None:  # already wrapped
        compiled_on.update(device_types)
        return True
    try:
        compiled = torch.compile(current, dynamic=False)
    except Exception as exc:
        log.warning("torch.compile unavailable, rotary stays eager: %s", exc)
        return False
    original = current

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        step = compiled if _decoding(q, apply_rotary_pos_emb.compiled_device_types) else original
        return step(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.compiled_device_types = set(device_types)
    apply_rotary_pos_emb.__wrapped__ = original
    setattr(module, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    return True


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def fuse_gated_activation(model, device_types=("cuda",)) -> int:
    """Route the SiLU-gated MLPs (LLaMA's down(silu(gate(x)) * up(x))) through one compiled kernel for
    silu(gate) * up when decoding, instead of two launches per layer (silu, then mul: ~100 us of a 7B
    decoding step on an H200, bench/RESULTS.md). Returns how many MLPs were routed."""
    try:
        compiled = torch.compile(_silu_mul, dynamic=False)
    except Exception as exc:
        log.warning("torch.compile unavailable, the MLP activation stays eager: %s", exc)
        return 0
    count = 0
    for module in model.modules():
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        if not isinstance(module.act_fn, torch.nn.SiLU) and type(module.act_fn).__name__ != "SiLUActivation":
            continue
        original = module.forward

        def forward(x, _m=module, _original=original):
            if not _decoding(x, device_types):
                return _original(x)
            return _m.down_proj(compiled(_m.gate_proj(x), _m.up_proj(x)))

        forward.__wrapped__ = original
        module.forward = forward
        count += 1
    return count


def _add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The decoder block's residual add and the RMSNorm that follows it, as one function so torch.compile
    makes one kernel of both: (residual + delta, its norm)."""
    total = residual + delta
    return total, _rms_norm(total, weight, eps)


# decoder layers whose forward is exactly the pre-norm residual block below (checked in transformers 5.x)
_PRE_NORM_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


class ResidualRoute:
    """What a layer's last fused add-and-norm leaves for the next norm: the sum the layer returns and
    that sum already normalised with the next norm's weight. The next norm takes it only when it gets
    that very tensor, so anything else (a prompt, another caller) is normalised as usual. use_kernel:
    add and norm through the Triton kernel (norm_kernel.py) where it applies, else torch.compile's; the
    kernel's first call on each device type is checked against torch, and a kernel that computes
    wrong numbers there (or fails to compile) is switched off, as the attention route does.
    orders: norm module -> (the act-order perm its readers share, the norm's weight in that order), from
    act_order.presort_inputs; the kernel writes that norm's output in that order and marks it
    (act_order.mark_sorted).
    Prompts take the route too, but only through the kernel (one program per row, any prompt length):
    torch.compile's form is compiled per shape, so a prompt the kernel cannot take runs the layer's own
    forward. prompts=False sends every prompt there (bench.act_order's A/B)."""
    __slots__ = ("total", "normed", "use_kernel", "compiled", "verified", "orders", "prompts")

    def __init__(self, compiled):
        self.total = self.normed = None
        self.use_kernel, self.compiled = True, compiled
        self.verified: set[str] = set()
        self.orders: dict = {}
        self.prompts = True

    def takes_prompt(self, x: torch.Tensor, norm) -> bool:
        """Whether a prompt's rows go through the kernel: decoder layers then get their norms' output in
        their projections' act-order (no gathers for q/k/v and gate/up) and one launch per add + norm."""
        return self.prompts and self.use_kernel and norm_kernel.supports(x, norm.weight)

    def take(self, x: torch.Tensor):
        return self.normed if x is self.total else None

    def norm(self, x: torch.Tensor, norm):
        """norm(x) alone (the first layer's input norm), through the kernel where it applies."""
        order, ordered_weight = self.orders.get(norm, (None, None))
        if self._kernel_applies(x, None, norm, order):
            normed = norm_kernel.add_rms_norm(x, None, norm.weight, norm.variance_epsilon, order, ordered_weight)[1]
            return self._marked(normed, order)
        return norm(x)

    def add_norm(self, residual: torch.Tensor, delta: torch.Tensor, norm):
        """(residual + delta, its norm): through the kernel where it applies, else torch.compile's kernel for
        one-token rows (the shape it was compiled for) and eager torch for a prompt (no compile per length)."""
        order, ordered_weight = self.orders.get(norm, (None, None))
        if self._kernel_applies(residual, delta, norm, order):
            total, normed = norm_kernel.add_rms_norm(residual, delta, norm.weight, norm.variance_epsilon, order,
                                                     ordered_weight)
            return total, self._marked(normed, order)
        fallback = self.compiled if residual.shape[-2] == 1 else _add_rms_norm
        return fallback(residual, delta, norm.weight, norm.variance_epsilon)

    @staticmethod
    def _marked(normed: torch.Tensor, order):
        return act_order.mark_sorted(normed, order) if order is not None else normed

    def _kernel_applies(self, residual: torch.Tensor, delta: torch.Tensor | None, norm, order=None) -> bool:
        if not (self.use_kernel and norm_kernel.supports(residual, norm.weight)):
            return False
        if delta is not None and not (delta.is_contiguous() and delta.shape == residual.shape
                                      and delta.dtype == residual.dtype):
            return False
        device = residual.device.type
        if device in self.verified or (device == "cuda" and torch.cuda.is_current_stream_capturing()):
            return True
        try:  # the first call checks the kernel against torch, in the column order it will write
            total, normed = norm_kernel.add_rms_norm(residual, delta, norm.weight, norm.variance_epsilon, order)
            want_total, want = (_add_rms_norm(residual, delta, norm.weight, norm.variance_epsilon) if delta is not None
                                else (residual, _rms_norm(residual, norm.weight, norm.variance_epsilon)))
            if order is not None:
                want = want[..., order.long()]
            problem = disagreement(total, want_total) or disagreement(normed, want)
        except Exception as exc:  # e.g. the kernel does not compile for this GPU
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            log.warning("add + RMSNorm kernel off (%s): residual adds go through torch.compile", problem)
            self.use_kernel = False
            return False
        self.verified.add(device)
        return True


def residual_route(model) -> ResidualRoute | None:
    """The route of a model whose residual adds fuse_residual_norms routed (None when not routed)."""
    for layer in getattr(getattr(model, "model", model), "layers", ()):
        return getattr(layer.forward, "residual_route", None)
    return None


def fuse_residual_norms(model, device_types=("cuda",)) -> int:
    """Route each pre-norm decoder layer's two residual adds through the norm that follows them when
    decoding: add + post-attention norm as one kernel, and the closing add + the next layer's input
    norm (or the model's final norm) as another. Why: on an H100 the 64 separate adds of a 7B step
    cost 83 us of 2.5 ms plus their launch gaps (bench/RESULTS.md). Prompts take the route where the
    Triton kernel takes them (ResidualRoute.takes_prompt): act-order projections then read sorted rows
    there too. Returns how many layers were routed; other devices run the layers' own forward."""
    inner = getattr(model, "model", model)
    layers = list(getattr(inner, "layers", ()))
    final_norm = getattr(inner, "norm", None)
    norm_ok = lambda m: (isinstance(getattr(m, "weight", None), torch.Tensor)
                         and isinstance(getattr(m, "variance_epsilon", None), float))
    if (not layers or not norm_ok(final_norm)
            or not all(type(l).__name__ in _PRE_NORM_LAYERS and norm_ok(l.input_layernorm)
                       and norm_ok(l.post_attention_layernorm) for l in layers)):
        return 0
    if all(getattr(l.forward, "residual_route", None) is not None for l in layers):  # routed before
        return len(layers)
    try:
        compiled = torch.compile(_add_rms_norm, dynamic=False)
    except Exception as exc:
        log.warning("torch.compile unavailable, residual adds stay separate: %s", exc)
        return 0
    route = ResidualRoute(compiled)
    next_norms = [l.input_layernorm for l in layers[1:]] + [final_norm]
    for layer, next_norm in zip(layers, next_norms):
        original = layer.forward

        def forward(hidden_states, *args, _l=layer, _next=next_norm, _original=original, **kwargs):
            routed = _decoding(hidden_states, device_types) or (
                hidden_states.device.type in device_types and route.takes_prompt(hidden_states, _l.input_layernorm))
            if args or not routed:
                return _original(hidden_states, *args, **kwargs)
            normed = route.take(hidden_states)
            if normed is None:
                normed = route.norm(hidden_states, _l.input_layernorm)
            attn_out, _ = _l.self_attn(hidden_states=normed, **kwargs)
            total, normed = route.add_norm(hidden_states, attn_out, _l.post_attention_layernorm)
            route.total, route.normed = route.add_norm(total, _l.mlp(normed), _next)
            return route.total

        forward.__wrapped__, forward.residual_route = original, route
        layer.forward = forward
    norm_forward = final_norm.forward

    def final_forward(x, _original=norm_forward):
        normed = route.take(x)
        if normed is None:
            return _original(x)
        route.total = route.normed = None  # a long prompt's rows are not held past its forward
        return normed

    final_forward.__wrapped__ = norm_forward
    final_norm.forward = final_forward
    return len(layers)


class GraphDecoder:
    """Prefill runs eagerly; the first decode step runs eagerly too (it warms up kernel tuning), the
    second captures the graph, later ones replay it. The cache length is fixed per instance; the batch
    (rows decoded side by side) is the prompt's, and a prompt of another batch starts a new cache and graph."""

    def __init__(self, model, device: torch.device, max_len: int, use_graph: bool = True, step_capture=None):
        self.model, self.device, self.max_len = model, device, max_len
        # step_capture(warm_up, fn, device) -> an object whose replay() runs fn's work again and returns
        # its output: CudaGraphStep on CUDA (tests on CPU pass a stand-in that re-runs fn)
        if step_capture is None and device.type == "cuda":
            step_capture = CudaGraphStep
        self.step_capture = step_capture
        self.use_graph = use_graph and self.step_capture is not None
        self.cache = None
        self.graph = None
        self.pos = 0
        self.eager_steps = 0
        from backends.torch_generation import cache_keyword
        self.cache_keyword = cache_keyword(model)
        self.static_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.static_pos = torch.zeros(1, dtype=torch.long, device=device)

    def _new_cache(self):
        from transformers import StaticCache
        return StaticCache(config=self.model.config, max_cache_len=self.max_len)

    def _forward(self, ids, positions):
        # positions go in both spellings: transformers up to ~5.20 places cache writes by cache_position,
        # later ones derive positions from the cache unless position_ids is given; the routed decode
        # attention (decode_attention.py) reads the token's position from position_ids
        out = self.model(input_ids=ids, **{self.cache_keyword: self.cache}, cache_position=positions,
                         position_ids=positions.view(1, -1), use_cache=True, logits_to_keep=1)
        return out.logits

    def _sync_cache_length(self) -> None:
        """Tell the HF cache layers how many positions are filled. Decoding steps through the routed
        attention write the cache themselves, so a cache that counts its own writes (newer
        transformers' cumulative_length) must be set before the next step that goes through HF."""
        for layer in getattr(self.cache, "layers", ()):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(self.pos)

    def step(self, input_ids: torch.Tensor, cache):
        n = input_ids.shape[1]
        if cache is None:  # a new prompt
            if n > self.max_len:
                raise BackendError(f"the prompt has {n} tokens, more than the static cache holds ({self.max_len})")
            if self.cache is None or input_ids.shape[0] != self.static_ids.shape[0]:
                self.cache, self.graph = None, None  # a graph replays one batch's tensors: free both first
                self.cache = self._new_cache()
                self.static_ids = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=self.device)
                self.eager_steps = 0
            else:
                self.cache.reset()
            logits = self._forward(input_ids, torch.arange(n, device=self.device))
            self.pos = n
            return logits, self
        if self.pos + n > self.max_len:
            raise BackendError(f"the static cache of {self.max_len} tokens is full")
        if not self.use_graph or self.eager_steps < 1 or n != 1:
            self._sync_cache_length()
            logits = self._forward(input_ids, torch.arange(self.pos, self.pos + n, device=self.device))
            self.eager_steps += 1
            self.pos += n
            return logits, self
        self.static_ids.copy_(input_ids)
        self.static_pos.fill_(self.pos)
        if self.graph is None:
            self._capture()
        if self.graph is not None:
            logits = self.graph.replay()
        else:
            logits = self._forward(input_ids, self.static_pos.clone())
        self.pos += 1
        return logits, self

    def _capture(self) -> None:
        def warm_up():
            self._forward(self.static_ids, self.static_pos)
            # the warm-up step advanced the cache's own position counter (transformers >= 5.x writes at
            # cumulative_length, not at cache_position): put it back, or every replay writes one slot
            # ahead of the position its mask and rotary use
            self._sync_cache_length()

        try:
            self.graph = self.step_capture(warm_up, lambda: self._forward(self.static_ids, self.static_pos),
                                           self.device)
        except Exception as exc:  # a model whose step cannot be captured still decodes, eagerly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
            self.graph = None
            self.use_graph = False


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per GPU on which every decoding graph warms up and is captured. Why one:
    torch keeps a cuBLAS workspace (32 MiB on Hopper) for each stream cuBLAS has run on, for the life
    of the process; a fresh stream per capture (every load, every growth of the static cache) kept
    one more each time (bench/RESULTS.md, "32 MiB of cuBLAS workspace per graph capture")."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _stream_of_gpu(index)


@functools.lru_cache(maxsize=None)
def _stream_of_gpu(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(torch.device("cuda", index))


class CudaGraphStep:
    """fn captured into a CUDA graph after warm_up() ran on the GPU's capture stream (a side stream, as
    torch recommends); replay() replays it and returns fn's output tensor, which every replay rewrites
    in place."""

    def __init__(self, warm_up, fn, device: torch.device):
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            warm_up()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.output = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
