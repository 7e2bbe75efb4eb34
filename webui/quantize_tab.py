"""The Quantize tab: pick a model and settings, see the estimate, start a GPTQ job, and watch its
progress, per-layer error log and a live memory chart (system RAM, process RSS, swap, GPU) updated
every second. The job lives in the server, so reloading the page shows the running job again."""
from __future__ import annotations

import html
import re
from pathlib import Path

import gradio as gr

from backends.base import BackendError
from quantizer.calibration import SOURCES
from quantizer.jobs import JobManager
from quantizer.settings import QuantizeSettings
from webui.page_js import follow_newest_js

TITLE = "Quantize"
UPLOAD = "file upload"
SERIES = (("ram_used_mb", "system RAM used"), ("rss_mb", "process RSS"), ("swap_used_mb", "swap used"),
          ("gpu_used_mb", "GPU memory"))
COLORS = {"system RAM used": "#4a7bd0", "process RSS": "#e07b39", "swap used": "#c0392b", "GPU memory": "#27ae60"}
# the log follows its newest line unless the user scrolls up to read
FOLLOW_LOG_JS = follow_newest_js("#quant-log textarea")
ON_SHOW_JS = FOLLOW_LOG_JS


def memory_svg(samples: list[dict], width: int = 640, height: int = 240) -> str:
    """The memory time series as an inline SVG: one polyline per series, a legend with each peak.
    Drawn here rather than with a plotting component, so it updates reliably every second."""
    left, right, top, bottom = 56, 12, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [f"<svg id='quant-memory-svg' xmlns='http://www.w3.org/2000/svg' width='100%' viewBox='0 0 {width} {height + 20}' "
             "style='font:11px sans-serif;background:transparent'>",
             f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#8886'/>"]
    if samples:
        t0 = samples[0]["t"]
        span = max(samples[-1]["t"] - t0, 1.0)
        top_mb = max(max(s[key] for s in samples for key, _ in SERIES), 1.0) * 1.1
        for frac in (0.0, 0.5, 1.0):
            y = top + plot_h * (1 - frac)
            parts.append(f"<text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end' fill='#888'>{top_mb * frac:,.0f}</text>")
        parts.append(f"<text x='{left}' y='{top + plot_h + 12}' fill='#888'>0 s</text>")
        parts.append(f"<text x='{left + plot_w}' y='{top + plot_h + 12}' text-anchor='end' fill='#888'>{span:.0f} s</text>")
        for n, (key, label) in enumerate(SERIES):
            points = " ".join(f"{left + plot_w * (s['t'] - t0) / span:.1f},{top + plot_h * (1 - s[key] / top_mb):.1f}"
                              for s in samples)
            parts.append(f"<polyline class='series' data-series='{key}' data-points='{len(samples)}' fill='none' "
                         f"stroke='{COLORS[label]}' stroke-width='2' points='{points}'/>")
            peak = max(s[key] for s in samples)
            x, y = left + (n % 2) * (plot_w // 2), height - 14 + 16 * (n // 2)
            parts.append(f"<rect x='{x}' y='{y + 6}' width='10' height='10' fill='{COLORS[label]}'/>"
                         f"<text x='{x + 14}' y='{y + 15}' fill='currentColor'>{label} (peak {peak:,.0f} MB)</text>")
    else:
        parts.append(f"<text x='{left + 8}' y='{top + 20}' fill='#888'>memory is sampled every second while a job runs</text>")
    parts.append("</svg>")
    return "".join(parts)


def progress_html(job: dict | None) -> str:
    if not job:
        return "<div id='quant-progress-text'>No quantization job yet.</div>"
    pct = 100.0 * job["progress"]
    # a finished job's last stage ("finishing") no longer describes it
    parts = [job["status"], f"{pct:.0f}%"] + ([job["stage"]] if job["stage"] and job["status"] == "running" else [])
    text = " · ".join(html.escape(part) for part in parts + [f"{job['elapsed']:.0f} s"])
    return (f"<div style='border:1px solid #8884;border-radius:6px;height:14px;overflow:hidden'>"
            f"<div style='width:{pct:.1f}%;height:100%;background:#4a7bd0'></div></div>"
            f"<div id='quant-progress-text'>{text}</div>")


def peaks_text(job: dict | None) -> str:
    if not job or not job["samples"]:
        return ""
    s = job["samples"]
    peak = {key: max(x[key] for x in s) for key, _ in SERIES}
    return (f"{len(s)} memory samples · peak system RAM {peak['ram_used_mb']:,.0f} MB · "
            f"peak RSS {peak['rss_mb']:,.0f} MB (start {job['baseline_rss_mb']:,.0f} MB) · "
            f"peak swap {peak['swap_used_mb']:,.0f} MB · peak GPU {peak['gpu_used_mb']:,.0f} MB")


SUGGESTED = re.compile(r".*-gptq(-\d+bit-g-?\d+)?$")


def comparison_markdown(comparison) -> str:
    """Each model's perplexity, the quantized one's as a change against the original (the first)."""
    items = list(comparison.ppl.items())
    lines = []
    for index, (name, ppl) in enumerate(items):
        line = f"- **{name}**: ppl {ppl:.3f}"
        if index and items[0][1] > 0:
            line += f" ({100 * (ppl / items[0][1] - 1):+.1f}% against {items[0][0]})"
        lines.append(line)
    windows = f"{comparison.windows} window{'' if comparison.windows == 1 else 's'}"
    lines.append(f"\nThe same {windows} of {comparison.seqlen} tokens of {comparison.dataset} for each; "
                 "lower is better.")
    return "\n".join(lines)


def suggest_name(model: str | None, bits, group, current: str = "") -> str:
    """A name from the settings, unless the user typed their own."""
    if current and not SUGGESTED.match(current):
        return current
    if not model:
        return ""
    base = re.sub(r"\.gguf$", "", Path(model).name)
    try:
        return f"{base}-gptq-{int(bits)}bit-g{int(group)}"
    except (TypeError, ValueError):
        return f"{base}-gptq"


class QuantizeTab:
    def __init__(self, ctx):
        self.ctx = ctx
        self.jobs = JobManager(exclusive=("quantize", "eval"))

    # -- data ----------------------------------------------------------------------------------
    def hf_models(self) -> list[str]:
        return [m.name for m in self.ctx.manager.list_models() if getattr(m, "format", None) == "hf"]

    def settings(self, bits, group, act_order, static_groups, true_seq, sym, damp, source, upload, nsamples,
                 seqlen, method="gptq", token_clip=0, mse=False) -> QuantizeSettings:
        if source == UPLOAD:
            if not upload:
                raise ValueError("choose a calibration file to upload (.txt, .jsonl or .parquet)")
            calib = upload if isinstance(upload, str) else getattr(upload, "name", str(upload))
        else:
            calib = source
        def as_int(value, what):
            try:
                f = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{what} must be a whole number, got {value!r}") from None
            if f != int(f):
                raise ValueError(f"{what} must be a whole number, got {value}")
            return int(f)
        try:
            damp = float(damp)
            token_clip = float(token_clip or 0)
        except (TypeError, ValueError):
            raise ValueError(f"damp and token clip must be numbers, got {damp!r} and {token_clip!r}") from None
        return QuantizeSettings(bits=as_int(bits, "bits"), group_size=as_int(group, "group size"),
                                act_order=bool(act_order), static_groups=bool(static_groups),
                                true_sequential=bool(true_seq), sym=bool(sym), damp=damp, calib=calib,
                                nsamples=as_int(nsamples, "nsamples"), seqlen=as_int(seqlen, "seqlen"),
                                method=str(method or "gptq"), token_clip=token_clip if token_clip > 0 else None,
                                mse=bool(mse)).validate()

    # -- events --------------------------------------------------------------------------------
    def estimate(self, model, *values):
        from quantizer.estimate import estimate
        if not model:
            return "Pick a model to see the memory and disk estimate."
        try:
            source = self.ctx.manager.resolve_path(model)
            return estimate(source, self.settings(*values), self.ctx.models_dir).markdown()
        except (BackendError, ValueError) as exc:
            return f"⚠️ {exc}"

    def start(self, model, out, *values):
        from quantizer.service import start_quantize
        try:
            if not model:
                raise ValueError("pick a model to quantize")
            job = start_quantize(self.jobs, self.ctx.models_dir, model, out, self.settings(*values))
        except (BackendError, ValueError) as exc:
            return f"❌ Not started: {exc}"
        return f"Started {job.title}."

    def cancel(self):
        job = self.jobs.latest("quantize")
        if job is None or not job.running:
            return "No running job to cancel."
        job.cancel()
        return f"Cancelling {job.title}: it stops within the current layer and leaves nothing half-written."

    def compare(self, windows):
        from quantizer.service import start_compare
        job = self.jobs.latest("quantize")
        if job is None or job.status != "done":
            return "Quantize a model first: the comparison uses the last finished checkpoint."
        try:
            count = int(float(windows or 10))
            if count < 1:
                raise ValueError(f"windows must be at least 1, got {count}")
            start_compare(self.jobs, self.ctx.models_dir, job.result.source, job.result.output.name,
                          seqlen=512, windows=count)
        except (BackendError, ValueError) as exc:
            return f"❌ {exc}"
        return "⏳ Evaluating both models on the same wikitext2 windows..."

    def poll(self):
        job = self.jobs.latest("quantize")
        snap = job.snapshot() if job else None
        log = "\n".join(snap["log"][-400:]) if snap else ""
        status = ""
        if snap:
            if snap["status"] == "done":
                status = f"✅ Done: **{job.result.output.name}** is in the models folder (see the Models tab)."
            elif snap["status"] == "failed":
                status = f"❌ Failed: {snap['error']}"
            elif snap["status"] == "cancelled":
                status = "⏹ Cancelled: nothing was written to the models folder."
            else:
                status = f"⏳ Running: {snap['title']}"
        ev = self.jobs.latest("eval")
        compare = ""
        if ev is not None:
            es = ev.snapshot()
            if es["status"] == "done":
                compare = comparison_markdown(ev.result)
            elif es["status"] == "failed":
                compare = f"❌ {es['error']}"
            else:
                compare = f"⏳ {es['stage']} ({100 * es['progress']:.0f}%)"
        return (progress_html(snap), status, log, memory_svg(snap["samples"] if snap else []),
                peaks_text(snap), compare)

    # -- layout --------------------------------------------------------------------------------
    def build(self) -> None:
        models = self.hf_models()
        # act-order + static groups: the best 4-bit setting measured on the default model (bench/RESULTS.md),
        # and static groups keep g_idx monotonic, so every kernel reads the checkpoint without reordering
        d = QuantizeSettings(act_order=True, static_groups=True)
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(models, value=models[0] if models else None, label="Model to quantize",
                                    allow_custom_value=True, elem_id="quant-model")
                with gr.Row():
                    bits = gr.Dropdown([2, 3, 4, 8], value=d.bits, label="Bits", elem_id="quant-bits")
                    group = gr.Number(d.group_size, label="Group size (-1 = per column)", precision=0, elem_id="quant-group")
                    damp = gr.Number(d.damp, label="Damp", elem_id="quant-damp")
                with gr.Row():
                    act_order = gr.Checkbox(d.act_order, label="Act-order", elem_id="quant-act-order")
                    static_groups = gr.Checkbox(d.static_groups, label="Static groups", elem_id="quant-static")
                    true_seq = gr.Checkbox(d.true_sequential, label="True-sequential", elem_id="quant-true-seq")
                    sym = gr.Checkbox(d.sym, label="Symmetric", elem_id="quant-sym")
            with gr.Column(scale=2):
                source = gr.Dropdown([*SOURCES, UPLOAD], value=d.calib, label="Calibration source",
                                     info="generated: the model writes its own calibration text first (offline; "
                                          "the best models measured, but ~10 min for the default model on 2 CPU "
                                          "cores); builtin: offline prose, quick but weak; c4: one 320 MB download",
                                     elem_id="quant-source")
                upload = gr.File(label="Calibration file (.txt, .jsonl, .parquet)", visible=False,
                                 file_types=[".txt", ".jsonl", ".parquet"], type="filepath", elem_id="quant-upload")
                with gr.Row():
                    nsamples = gr.Number(d.nsamples, label="Samples", precision=0, elem_id="quant-nsamples")
                    seqlen = gr.Number(d.seqlen, label="Tokens per sample", precision=0, elem_id="quant-seqlen")
                with gr.Accordion("Advanced", open=False, elem_id="quant-advanced"):
                    with gr.Row():
                        method = gr.Radio(["gptq", "rtn"], value=d.method, label="Method",
                                          info="rtn: round-to-nearest, the baseline", elem_id="quant-method")
                        token_clip = gr.Number(d.token_clip or 0, label="Token clip (0 = off)",
                                               info="caps a massive-activation token's Hessian weight at this "
                                                    "multiple of the median token norm", elem_id="quant-token-clip")
                        mse = gr.Checkbox(d.mse, label="MSE range search", elem_id="quant-mse")
                out = gr.Textbox(suggest_name(model.value, d.bits, d.group_size), label="Output name (in the models folder)",
                                 elem_id="quant-out")
        estimate = gr.Markdown("", elem_id="quant-estimate")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="quant-start")
            cancel = gr.Button("Cancel", variant="stop", elem_id="quant-cancel")
        message = gr.Markdown("", elem_id="quant-message")
        progress = gr.HTML(progress_html(None), elem_id="quant-progress")
        status = gr.Markdown("", elem_id="quant-status")
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("**Memory during the job (MB)**: system RAM used, this process's RSS, swap used, GPU memory")
                chart = gr.HTML(memory_svg([]), elem_id="quant-memory")
                peaks = gr.Markdown("", elem_id="quant-peaks")
            with gr.Column(scale=2):
                log = gr.Textbox("", label="Log (per-layer relative output error, GPTQ vs RTN)", lines=12,
                                 max_lines=12, interactive=False, elem_id="quant-log")
        with gr.Row():
            windows = gr.Number(10, label="Perplexity windows (512 tokens, wikitext2)", precision=0,
                                elem_id="quant-windows")
            compare = gr.Button("Compare perplexity: original vs quantized", elem_id="quant-compare")
        compare_out = gr.Markdown("", elem_id="quant-compare-result")

        values = [bits, group, act_order, static_groups, true_seq, sym, damp, source, upload, nsamples, seqlen,
                  method, token_clip, mse]
        for comp in [model, *values]:
            comp.change(self.estimate, [model, *values], estimate)
        for comp in (model, bits, group):
            comp.change(suggest_name, [model, bits, group, out], out)
        source.change(lambda s: gr.update(visible=s == UPLOAD), source, upload)
        start.click(self.start, [model, out, *values], message)
        cancel.click(self.cancel, None, message)
        compare.click(self.compare, windows, compare_out)
        log.change(None, None, None, js=FOLLOW_LOG_JS, queue=False, api_visibility="private")
        timer = gr.Timer(1.0)
        outputs = [progress, status, log, chart, peaks, compare_out]
        timer.tick(self.poll, None, outputs)
        if self.ctx.blocks is not None:
            self.ctx.blocks.load(self.poll, None, outputs)
            self.ctx.blocks.load(self.estimate, [model, *values], estimate)


def build(ctx) -> None:
    QuantizeTab(ctx).build()
