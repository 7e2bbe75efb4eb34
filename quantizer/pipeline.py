"""The layer-by-layer GPTQ pipeline (DESIGN.md, "Data flow of a quantization").

Draw calibration tokens, capture the inputs of decoder layer 0, then per layer: read its weights from
the shards, accumulate each linear's Hessian over the calibration set, quantize the linears (in
true-sequential order when asked), write the packed layer into `<out>.partial/`, and compute the
layer's outputs with the quantized weights as the next layer's inputs. The full model is never in
RAM. After every layer `state.json` records what is done, so a killed job resumes from the last
finished layer; the folder is renamed into place only when the checkpoint is complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backends.base import BackendError
from backends.gptq import format as gptq_format
from backends.process_memory import release_memory
from quantizer import calibration, generated_calibration, st_stream
from quantizer.activations import ActivationStore, choose_location
from quantizer.gptq import Hessian, gptq_quantize, relative_output_errors
from quantizer.grid import rtn
from quantizer.layers import LayerFactory, ShardReader, arch_for, read_config, run_layer
from quantizer.settings import QuantizeSettings

log = logging.getLogger(__name__)

VERSION = "0.1"
STATE_FILE = "state.json"
PARTIAL_SUFFIX = ".partial"
GENERATED_TOKENS_FILE = "calibration-tokens.safetensors"  # generated tokens, kept for a resume
MERGE_LIMIT_BYTES = 1 << 30  # up to 1 GiB the result is one model.safetensors, else one shard per layer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")

Report = Callable[[dict], None]


class Cancelled(BackendError):
    """The job was asked to stop; nothing half-written is left in place."""


@dataclass
class QuantizeResult:
    output: Path
    seconds: float
    source: str = ""
    layers: list[dict] = field(default_factory=list)
    device: str = "cpu"
    activations: str = "cpu"
    peak_gpu_mb: float = 0.0
    resumed_from: int = 0


# ------------------------------------------------------------------------------------------------
# paths and checks (all before any work)
# ------------------------------------------------------------------------------------------------
def _valid_name(name: str) -> str:
    name = str(name or "").strip()
    if not name:
        raise BackendError("give the output model a name")
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise BackendError(f"output name {name!r} must be a plain folder name inside the models folder "
                           "(no '/', '..' or leading '.')")
    if name.endswith(PARTIAL_SUFFIX):
        raise BackendError(f"output name must not end with {PARTIAL_SUFFIX}")
    return name


def resolve_source(models_dir: Path, name: str) -> Path:
    models_dir = Path(models_dir).resolve()
    raw = str(name or "").strip()
    if not raw:
        raise BackendError("pick a model to quantize")
    path = (models_dir / raw).resolve()
    if models_dir not in path.parents:
        raise BackendError(f"{raw!r} is outside the models folder {models_dir}")
    if not path.is_dir():
        raise BackendError(f"{raw!r}: no such model folder in {models_dir}")
    return path


def resolve_output(models_dir: Path, name: str, resume: bool = False) -> tuple[Path, Path]:
    """(final folder, partial folder); refuses names that exist or escape the models folder."""
    models_dir = Path(models_dir).resolve()
    name = _valid_name(name)
    out = models_dir / name
    if out.resolve().parent != models_dir:
        raise BackendError(f"output {name!r} would land outside the models folder")
    if out.exists() or out.is_symlink():
        raise BackendError(f"a model named {name!r} already exists in the models folder; pick another name")
    partial = models_dir / (name + PARTIAL_SUFFIX)
    if partial.exists() and not resume:
        raise BackendError(f"an unfinished job left {partial.name}; resume it (--resume) or delete that folder")
    return out, partial


@dataclass
class Plan:
    """Everything checked and known before the first layer runs."""
    source: Path
    output: Path
    partial: Path
    settings: QuantizeSettings
    config: dict
    reader: ShardReader


def plan(models_dir: Path, source_name: str, out_name: str, settings: QuantizeSettings, resume: bool = False) -> Plan:
    """Validate settings, source and output; raise ValueError/BackendError with the reason. Writes nothing."""
    settings.validate()
    source = resolve_source(models_dir, source_name)
    output, partial = resolve_output(models_dir, out_name, resume)
    config = read_config(source)
    arch_for(config)
    reader = ShardReader(source)
    _check_shapes(config, settings)
    if not calibration.validate_source(settings.calib):
        raise BackendError(f"calibration source {settings.calib!r} is neither one of "
                           f"{', '.join(calibration.SOURCES)} nor an existing file")
    if str(settings.calib).lower() not in calibration.SOURCES:
        calibration.file_documents(Path(settings.calib))  # empty, binary or malformed: say so now
    return Plan(source, output, partial, settings, config, reader)


def _check_shapes(config: dict, s: QuantizeSettings) -> None:
    hidden = int(config["hidden_size"])
    inter = int(config.get("intermediate_size", 4 * hidden))
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads", heads)) * head_dim
    dims = {hidden, inter, heads * head_dim, kv}
    if s.bits == 3:
        bad = sorted(d for d in dims if d % 32)
        if bad:
            raise BackendError(f"3-bit packing needs every layer dimension to be a multiple of 32; "
                               f"this model has {', '.join(map(str, bad))}")
    else:
        per = 32 // s.bits
        bad = sorted(d for d in dims if d % per)
        if bad:
            raise BackendError(f"{s.bits}-bit packing needs dimensions that are multiples of {per}; got {bad}")


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _device(settings: QuantizeSettings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BackendError("device cuda was asked for but no CUDA GPU is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _read_state(partial: Path) -> dict | None:
    path = partial / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_state(partial: Path, state: dict) -> None:
    tmp = partial / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, partial / STATE_FILE)


def _layer_file(partial: Path, i: int) -> Path:
    return partial / f"layer-{i:05d}.safetensors"


def _save_atomic(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def run(p: Plan, report: Report | None = None, should_stop: Callable[[], bool] | None = None,
        keep_partial_on_cancel: bool = True, on_module: Callable[[str, object], None] | None = None) -> QuantizeResult:
    """Quantize; return where the checkpoint is. On cancel the partial folder is kept for --resume
    (or removed when `keep_partial_on_cancel` is false); nothing appears under the final name.
    `on_module(name, QuantResult)` sees each linear's result (tests compare it with the file)."""
    report = report or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    started = time.perf_counter()
    s = p.settings
    device = _device(s)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    state = _read_state(p.partial)
    _remove_spills(p.partial)  # activations a killed run spilled to disk are stale
    resume_from = 0
    wanted = {"source": p.source.name, "settings": s.to_dict(), "version": VERSION}
    if state is not None:
        if {k: state.get(k) for k in wanted} != wanted:
            raise BackendError(f"{p.partial.name} was started with other settings or another source; "
                               "delete it or resume with the same settings")
        resume_from = int(state.get("finished", 0))
    else:
        p.partial.mkdir(parents=True, exist_ok=True)
        state = dict(wanted, finished=0, layers=[])
        _write_state(p.partial, state)
    try:
        result = _run_layers(p, state, resume_from, device, dtype, report, should_stop, on_module)
        result.resumed_from = resume_from
        result.source = p.source.name
        report({"kind": "stage", "stage": "finishing", "text": "writing the checkpoint"})
        _finish(p, state)
    except Cancelled:
        worth_resuming = state.get("finished", 0) > 0 or (p.partial / GENERATED_TOKENS_FILE).is_file()
        if not keep_partial_on_cancel or not worth_resuming:
            shutil.rmtree(p.partial, ignore_errors=True)
        raise
    except BaseException:
        if state.get("finished", 0) == 0:  # nothing worth resuming
            shutil.rmtree(p.partial, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - started
    if device.type == "cuda":
        result.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    report({"kind": "done", "output": str(p.output), "seconds": result.seconds})
    return result


def _calibration_tokens(p: Plan, device, dtype, report: Report, should_stop) -> torch.Tensor:
    """The job's [nsamples, seqlen] calibration tokens. Generated ones are kept in the partial folder, so a
    resumed job calibrates on the very same tokens without generating them again."""
    s = p.settings
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(p.source), trust_remote_code=False)
    try:
        if str(s.calib).lower() != calibration.GENERATED:
            report({"kind": "stage", "stage": "calibration",
                    "text": f"drawing {s.nsamples} x {s.seqlen} tokens from {s.calib}"})
            return calibration.calibration_tokens(s.calib, tokenizer, s.nsamples, s.seqlen, s.seed)
        saved = p.partial / GENERATED_TOKENS_FILE
        if saved.is_file():
            report({"kind": "stage", "stage": "calibration", "text": "calibration text: the tokens generated before"})
            return load_file(str(saved))["tokens"]
        report({"kind": "stage", "stage": "calibration",
                "text": f"the model generates {s.nsamples} x {s.seqlen} tokens of calibration text on {device}"})
        t0 = time.perf_counter()
        try:
            tokens = generated_calibration.generate_tokens(p.source, tokenizer, s.nsamples, s.seqlen, s.seed, device,
                                                           dtype, report, should_stop,
                                                           lambda: Cancelled("quantization cancelled"))
        except (MemoryError, torch.OutOfMemoryError) as exc:
            where = "GPU" if device.type == "cuda" else "RAM"
            raise BackendError(f"out of memory ({where}) while the model wrote its calibration text: the generated "
                               "source loads the whole model, and it does not fit here. Pick builtin, c4 or a text "
                               "file as the calibration source: they stream the model one layer at a time") from exc
        _save_atomic({"tokens": tokens.contiguous()}, saved)
        seconds = time.perf_counter() - t0
        report({"kind": "stage", "stage": "calibration", "generation_s": seconds,
                "text": f"calibration text generated in {seconds:.0f} s"})
        return tokens
    finally:
        del tokenizer
        release_memory()


def _run_layers(p: Plan, state: dict, resume_from: int, device, dtype, report: Report,
                should_stop, on_module=None) -> QuantizeResult:
    s = p.settings
    factory = LayerFactory(p.source, p.config, p.reader)
    n_layers = factory.num_layers
    if resume_from >= n_layers:
        return QuantizeResult(output=p.output, seconds=0.0, layers=state["layers"], device=str(device))
    tokens = _calibration_tokens(p, device, dtype, report, should_stop)

    shape = (s.seqlen, factory.hidden)
    nbytes = s.nsamples * s.seqlen * factory.hidden * torch.tensor([], dtype=dtype).element_size()
    location = choose_location(nbytes, device)
    spill = p.partial if location == "disk" else None
    inps = ActivationStore(s.nsamples, shape, dtype, location, device, spill)
    outs = ActivationStore(s.nsamples, shape, dtype, location, device, spill)
    report({"kind": "stage", "stage": "embeddings",
            "text": f"activations: {2 * nbytes / 2**20:.0f} MB kept on {location}; device {device}"})
    try:
        with torch.inference_mode():
            embed = p.reader.read([factory.arch.embed], device=device)[factory.arch.embed]  # source dtype
            for j in range(s.nsamples):
                inps.set(j, torch.nn.functional.embedding(tokens[j].to(device), embed).to(dtype))
            del embed
            pos, pe = factory.rotary(s.seqlen, dtype, device)
            if resume_from:
                report({"kind": "stage", "stage": "resume",
                        "text": f"resuming after layer {resume_from}/{n_layers}: recomputing its inputs"})
            for i in range(resume_from):
                _check(should_stop)
                layer = factory.build(i, dtype, device)
                _load_quantized(layer, _layer_file(p.partial, i), factory.prefix(i), factory.linear_names(),
                                s.bits, s.checkpoint_format, dtype)
                _forward_all(layer, inps, outs, pos, pe, s.batch_size, should_stop)
                inps, outs = outs, inps
                del layer
            for i in range(resume_from, n_layers):
                t0 = time.perf_counter()
                report({"kind": "layer_start", "layer": i, "layers": n_layers})
                timing = _Timer(device)
                with timing.stage("load"):
                    layer = factory.build(i, dtype, device)
                modules, held = _quantize_layer(layer, i, n_layers, factory, inps, outs, pos, pe, s, report,
                                                should_stop, timing, on_module)
                _check(should_stop)
                with timing.stage("forward_out"):
                    _forward_all(layer, inps, outs, pos, pe, s.batch_size, should_stop, held)
                _check(should_stop)
                with timing.stage("pack_save"):
                    _save_atomic(_pack_layer(layer, factory.prefix(i), modules), _layer_file(p.partial, i))
                entry = {"layer": i, "seconds": round(time.perf_counter() - t0, 3),
                         "modules": {name: m["stats"] for name, m in modules.items()},
                         "timing": timing.rounded()}
                state["layers"].append(entry)
                state["finished"] = i + 1
                _write_state(p.partial, state)
                inps, outs = outs, inps
                del layer, modules
                release_memory()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                report({"kind": "layer_done", "layer": i, "layers": n_layers, **entry})
    finally:
        inps.close()
        outs.close()
    return QuantizeResult(output=p.output, seconds=0.0, layers=state["layers"], device=str(device),
                          activations=location)


class _Timer:
    """Seconds per stage of one layer: `load` (weights to the device), `forward_hessian` (the forwards
    that feed the Hessians, including `hessian`, the accumulation itself), `quantize` (fit, GPTQ or RTN
    and the error statistics of every linear), `forward_out` (the layer's outputs with the quantized
    weights), `pack_save` (packing and writing the layer). CUDA work is asynchronous, so the device is
    synchronized at the start and end of each stage only (a handful of syncs per layer); `hessian` is
    measured with CUDA events inside its stage and read after the stage's closing sync."""

    STAGES = ("load", "forward_hessian", "hessian", "quantize", "forward_out", "pack_save")

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self._events = []

    def timed(self, name: str, fn, *args) -> None:
        """fn(*args) inside a stage, timed without a device sync."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            self.seconds[name] += time.perf_counter() - t0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            for event_name, start, end in self._events:
                self.seconds[event_name] += start.elapsed_time(end) / 1000
            self._events.clear()

    def rounded(self) -> dict:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class _InputsSeen(Exception):
    """Raised by a pre-hook to end a layer forward early: the rest of the layer is not needed yet."""


def _stop_forward(module, inputs):
    raise _InputsSeen


def _check(should_stop) -> None:
    if should_stop():
        raise Cancelled("quantization cancelled")


def _batches(n: int, batch: int, should_stop):
    for j in range(0, n, batch):
        _check(should_stop)
        yield range(j, min(j + batch, n))


def _forward_all(layer, inps: ActivationStore, outs: ActivationStore, pos, pe, batch: int, should_stop,
                 held: "_Held | None" = None) -> None:
    """outs = the layer's outputs. When `held` says outs already hold the residual h of every sample
    (left by the true-sequential passes), only the MLP half runs: y = h + mlp(post_norm(h))."""
    for idx in _batches(inps.n, batch, should_stop):
        if held is not None and held.kind == "residual":
            h = outs.get_batch(idx)
            y = h + held.mlp(held.post_norm(h))
        else:
            y = run_layer(layer, inps.get_batch(idx), pos, pe)
        outs.set_batch(idx, y)


class _Held:
    """What the outputs store holds mid-layer, so a true-sequential pass can start there instead of
    at the layer input (the store is otherwise idle until the layer's outputs are computed):
    `attn`, the inputs of o_proj (attention with quantized q/k/v), or `residual`, h = x + o_proj(attn)
    once o_proj is quantized. Each pass then computes only the part of the block it needs: about one
    full forward per layer is saved, bit-identical to running the whole layer each time."""

    def __init__(self, layer, arch, hidden: int):
        self.kind = None
        self.enabled = bool(arch.post_norm and arch.mlp)
        self.post_norm = layer.get_submodule(arch.post_norm) if self.enabled else None
        self.mlp = layer.get_submodule(arch.mlp) if self.enabled else None
        self.mlp_prefix = f"{arch.mlp}."
        self.o_name = arch.o_proj
        self.o_proj = layer.get_submodule(arch.o_proj) if self.enabled and arch.o_proj else None
        # o_proj's input is only storable where it has the width of the hidden state
        self.attn_fits = self.o_proj is not None and self.o_proj.in_features == hidden

    def start_for(self, group: tuple[str, ...]) -> str:
        """Where the pass feeding `group` starts: the layer input, the stored attention output or h."""
        if self.enabled and group[0].startswith(self.mlp_prefix) and self.kind in ("attn", "residual"):
            return self.kind
        return "input"


def _quantize_layer(layer, i, n_layers, factory: LayerFactory, inps: ActivationStore, outs: ActivationStore,
                    pos, pe, s: QuantizeSettings, report: Report, should_stop,
                    timing: "_Timer | None" = None, on_module=None) -> tuple[dict, "_Held | None"]:
    """Quantize every linear of one decoder layer in place (weights become the fake-quantized ones);
    return per linear the checkpoint tensors and statistics (with its seconds: fit, GPTQ or RTN, and
    the error statistics), and what `outs` was left holding (see `_Held`). `timing` collects the
    seconds of the Hessian forwards and of quantizing."""
    timing = timing or _Timer(inps.device)
    groups = factory.arch.sequential
    # RTN does not depend on the inputs: one pass only feeds the error statistics
    sequential = s.true_sequential and s.method != "rtn"
    passes = [[g] for g in groups] if sequential else [groups]
    held = _Held(layer, factory.arch, factory.hidden) if sequential else None
    results = {}
    device = inps.device
    grid, opts = s.grid(), s.gptq_options()
    for pass_groups in passes:
        _check(should_stop)
        hessians, handles = {}, []
        for group in pass_groups:
            first = layer.get_submodule(group[0])
            hess = Hessian(first.in_features, device, token_clip=opts.token_clip)
            hessians[group] = hess
            handles.append(first.register_forward_pre_hook(
                lambda m, inp, h=hess: timing.timed("hessian", h.add, inp[0])))
        last = pass_groups[-1]
        start = held.start_for(last) if held is not None else "input"
        batch_idx: list = []  # the samples of the running batch, for the hooks that store into outs

        def keep(kind):
            def hook(module, inputs):
                outs.set_batch(batch_idx, inputs[0])
                held.kind = kind
            return hook

        if held is not None and held.enabled and start == "input":
            if held.attn_fits and last[0] == held.o_name:
                handles.append(held.o_proj.register_forward_pre_hook(keep("attn")))
            if last[0].startswith(held.mlp_prefix):
                handles.append(held.post_norm.register_forward_pre_hook(keep("residual")))
        # the forward can stop once the last group of this pass has seen its input
        handles.append(layer.get_submodule(last[0]).register_forward_pre_hook(_stop_forward))
        try:
            with timing.stage("forward_hessian"):
                for idx in _batches(inps.n, s.batch_size, should_stop):
                    batch_idx[:] = idx
                    try:
                        if start == "input":
                            run_layer(layer, inps.get_batch(idx), pos, pe)
                            continue
                        if start == "attn":  # h = x + o_proj(attention output), kept for what follows
                            h = inps.get_batch(idx) + held.o_proj(outs.get_batch(idx))
                            outs.set_batch(idx, h)
                        else:
                            h = outs.get_batch(idx)
                        held.mlp(held.post_norm(h))
                    except _InputsSeen:
                        pass
                if start == "attn":
                    held.kind = "residual"
        finally:
            for h in handles:
                h.remove()
        for group, hess in hessians.items():
            for name in group:
                _check(should_stop)
                report({"kind": "module", "layer": i, "layers": n_layers, "module": name})
                t_module = timing.seconds["quantize"]
                with timing.stage("quantize"):
                    linear = layer.get_submodule(name)
                    weight = linear.weight.data.float()
                    full = f"{factory.prefix(i)}{name}"
                    baseline = rtn(weight, grid)
                    if s.method == "rtn":
                        q = baseline
                        error = rtn_error = relative_output_errors(weight, [baseline.weight], hess.H)[0]
                    else:
                        q = gptq_quantize(weight, hess.H, grid, opts, name=full)
                        error, rtn_error = relative_output_errors(weight, [q.weight, baseline.weight], hess.H)
                    stats = {"error": error, "rtn_error": rtn_error}
                    if q.damp is not None:
                        stats["damp"] = q.damp
                    linear.weight.data.copy_(q.weight.to(linear.weight.dtype))
                stats["seconds"] = round(timing.seconds["quantize"] - t_module, 3)
                if on_module is not None:
                    on_module(full, q)
                del weight, baseline
                # packed now: the layer keeps its codes at bits/32 words per weight, not as a second
                # float copy of the weights and an int32 one (a 7B layer: 100 MB instead of 1.6 GB)
                with timing.stage("pack_save"):
                    results[name] = {"tensors": _pack_linear(q, s), "stats": stats}
                del q
            hess.H = None
    return results, held


def _pack_linear(q, s: QuantizeSettings) -> dict:
    """One linear's checkpoint tensors (GPTQ_FORMAT.md), keyed by suffix, on CPU. Packed where the
    codes are (the GPU when there is one: packing a 7B layer on one CPU core takes seconds)."""
    return {"qweight": gptq_format.pack_qweight(q.codes.T.contiguous(), s.bits).cpu(),
            "qzeros": gptq_format.pack_qzeros(q.zeros, s.bits, s.checkpoint_format).cpu(),
            "scales": q.scales.to(torch.float16).cpu().contiguous(),
            "g_idx": q.g_idx.to(torch.int32).cpu().contiguous()}


def _pack_layer(layer, prefix: str, modules: dict) -> dict:
    """The layer's tensors in GPTQ_FORMAT.md terms, on CPU (unquantized ones as float16)."""
    tensors = {}
    for name, entry in modules.items():
        base = f"{prefix}{name}"
        tensors.update({f"{base}.{suffix}": t for suffix, t in entry["tensors"].items()})
        bias = layer.get_submodule(name).bias
        if bias is not None:
            tensors[f"{base}.bias"] = bias.detach().to(torch.float16).cpu().contiguous()
    quantized = {f"{name}.weight" for name in modules} | {f"{name}.bias" for name in modules}
    for key, value in layer.state_dict().items():
        if key not in quantized:
            tensors[f"{prefix}{key}"] = value.detach().to(torch.float16).cpu().contiguous()
    return tensors


def _load_quantized(layer, path: Path, prefix: str, names: list[str], bits: int, fmt: str, dtype) -> None:
    """Put a finished layer's dequantized weights into `layer` (resume): bit-identical to the
    fake-quantized weights the original run continued with."""
    if not path.is_file():
        raise BackendError(f"resume: {path.name} is missing from the partial folder; delete it and start over")
    with safe_open(str(path), framework="pt") as fh:
        for name in names:
            base = f"{prefix}{name}"
            W = gptq_format.dequantize(fh.get_tensor(f"{base}.qweight"), fh.get_tensor(f"{base}.qzeros"),
                                       fh.get_tensor(f"{base}.scales"), fh.get_tensor(f"{base}.g_idx"), bits, fmt)
            linear = layer.get_submodule(name)
            linear.weight.data.copy_(W.T.to(linear.weight.dtype))


# ------------------------------------------------------------------------------------------------
# finishing: extra tensors, configs, tokenizer, rename into place
# ------------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _file_entries(path: Path) -> list:
    """(name, dtype code, shape, fetch) of every tensor of a safetensors file, fetched lazily."""
    def fetch(key):
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key)
    with safe_open(str(path), framework="pt") as fh:
        return [(key, fh.get_slice(key).get_dtype(), tuple(fh.get_slice(key).get_shape()),
                 lambda key=key: fetch(key)) for key in fh.keys()]


def _remove_spills(partial: Path) -> None:
    if partial.is_dir():
        for stale in partial.glob("gptq-act-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _finish(p: Plan, state: dict) -> None:
    s = p.settings
    _remove_spills(p.partial)
    (p.partial / GENERATED_TOKENS_FILE).unlink(missing_ok=True)
    arch = arch_for(p.config)
    n_layers = int(p.config["num_hidden_layers"])
    extra = [(key, "F16", p.reader.shape(key), lambda key=key: p.reader.read([key], dtype=torch.float16)[key])
             for key in p.reader.keys() if not key.startswith(arch.layers_prefix + ".")]
    layer_files = [_layer_file(p.partial, i) for i in range(n_layers)]
    extra_bytes = sum(2 * _numel(shape) for _, _, shape, _ in extra)
    total = sum(f.stat().st_size for f in layer_files) + extra_bytes
    if total <= MERGE_LIMIT_BYTES:  # one model.safetensors, written tensor by tensor
        entries = [e for f in layer_files for e in _file_entries(f)] + extra
        st_stream.write(p.partial / "model.safetensors", entries)
        for f in layer_files:
            f.unlink()
    else:  # one shard per layer plus one for embeddings, norm and head
        files = layer_files + [p.partial / "extra.safetensors"]
        st_stream.write(files[-1], extra)
        weight_map = {}
        for index, f in enumerate(files):
            name = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    weight_map[key] = name
            os.replace(f, p.partial / name)
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (p.partial / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2), encoding="utf-8")
    damps = [m.get("damp") for layer in state["layers"] for m in layer["modules"].values() if m.get("damp")]
    # desc_act tells loaders that g_idx is not k // group_size, and vLLM and ExLlama take their slower
    # act-order paths for it (a gather of the activations per layer; our loader checks g_idx itself).
    # Round-to-nearest has no column order, and with static groups g_idx stays k // group_size: neither
    # claims one (meta keeps act_order).
    act_order = s.act_order and s.method == "gptq"
    qc = gptq_format.QuantizeConfig(
        bits=s.bits, group_size=s.group_size, desc_act=act_order and not s.static_groups,
        static_groups=s.static_groups and s.method == "gptq", sym=s.sym,
        true_sequential=s.true_sequential, damp_percent=s.damp, checkpoint_format=s.checkpoint_format,
        lm_head=False, model_name_or_path=p.source.name,
        meta={"quantizer": [f"gptq-webui:{VERSION}"], "method": s.method, "act_order": act_order,
              "calibration": calibration.describe(s.calib),
              "nsamples": s.nsamples, "seqlen": s.seqlen, "seed": s.seed, "mse": s.mse, "token_clip": s.token_clip,
              "damp_max_used": max(damps) if damps else None})
    base = dict(p.config)
    base["torch_dtype"] = "float16"
    if "dtype" in base:
        base["dtype"] = "float16"
    gptq_format.write_quantize_config(p.partial, qc, base)
    for name in TOKENIZER_FILES:
        src = p.source / name
        if src.is_file():
            shutil.copy2(src, p.partial / name)
    if p.output.exists():
        raise BackendError(f"{p.output.name} appeared while quantizing; the result stays in {p.partial.name}")
    os.replace(p.partial, p.output)
    (p.output / STATE_FILE).unlink()
