"""Compare tab: 2 to 4 (model, backend, options) entries loaded together; one prompt streams to all
of them at once in side-by-side columns; "Measure" fills a table and plots (bits per weight,
memory, perplexity, speed) with CSV and JSON export. The work itself is `bench.compare_core`,
shared with `python -m bench.compare`; this module is only the page."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from backends.base import BackendError, SamplingParams
from bench import compare_core as core
from webui.page_js import follow_newest_js

TITLE = "Compare"
# the streamed replies follow their newest line unless the user scrolls up to read
FOLLOW_REPLIES_JS = follow_newest_js("[id^=compare-reply-] textarea")
ON_SHOW_JS = FOLLOW_REPLIES_JS
MAX_ENTRIES = 4
TEXT_SOURCES = (*core.TEXT_SOURCES, "uploaded file")


class CompareSession:
    """One browser session's entries and Stop signal. Held in a gr.State: a deep copy (what gradio
    makes for every new session) is a fresh, empty session."""

    def __init__(self):
        self.slots: list[core.Slot] = []
        self.histories: list[list[dict]] = []   # per entry: its own earlier turns (chat mode)
        self.results: list[core.Result] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):
        return CompareSession()

    def release(self, manager) -> None:
        with self.lock:
            core.unload_slots(manager, self.slots)
            self.slots = []
            self.histories = []


# -- pure helpers (unit-tested) ----------------------------------------------------------------
def entries_from_form(values: list) -> list[core.Entry]:
    """Form rows (model, backend, options text) -> entries; rows without a model are skipped."""
    entries = []
    for model, backend, options in zip(values[0::3], values[1::3], values[2::3]):
        if not model:
            continue
        entries.append(core.Entry(backend or "auto", str(model), core.parse_options(options or "")))
    return entries


def load_table(slots: list[core.Slot]) -> list[list]:
    return [[s.label, s.error or f"loaded as {s.model_id}", round(s.rss_before_mb, 1),
             round(s.rss_after_mb, 1), round(s.rss_after_mb - s.rss_before_mb, 1), round(s.load_s, 1)]
            for s in slots]


def results_frame(results: list[core.Result]):
    import pandas as pd
    headers, rows = core.table_rows(results)
    return pd.DataFrame(rows, columns=headers)


def short_label(index: int, result: core.Result) -> str:
    """Plot labels must stay short: the entry's number and engine (the table has the full entry)."""
    return f"{index + 1}. {result.backend}"


def plot_frames(results: list[core.Result]):
    """(perplexity vs memory, tokens/s per entry) as data frames for gradio's native plots."""
    import pandas as pd
    ok = [(short_label(i, r), r) for i, r in enumerate(results) if r.error is None]
    memory = pd.DataFrame([{"entry": label, "memory MB": round((r.ram_mb or 0) + (r.gpu_mb or 0), 1),
                            "perplexity": round(r.ppl, 3)} for label, r in ok if r.ppl is not None],
                          columns=["entry", "memory MB", "perplexity"])
    speed_rows = []
    for label, r in ok:
        for kind, value in (("prefill", r.prefill_tok_s), ("decode", r.decode_tok_s)):
            if value is not None and value == value:
                speed_rows.append({"bar": f"{label} {kind}", "kind": kind, "tokens/s": round(value, 2)})
    speed = pd.DataFrame(speed_rows, columns=["bar", "kind", "tokens/s"])
    return memory, speed


def column_updates(slots: list[core.Slot], columns: list[core.Column] | None = None) -> list:
    """For each of the MAX_ENTRIES columns: (visibility, header, reply text, metrics)."""
    out = []
    for index in range(MAX_ENTRIES):
        if index >= len(slots):
            out += [gr.update(visible=False), "", "", ""]
            continue
        slot = slots[index]
        column = columns[index] if columns else None
        error = (column.error if column else None) or slot.error
        header = f"**{slot.label}**"
        if error:
            out += [gr.update(visible=True), header, "", f"⚠️ {error}"]
        elif column is None:
            out += [gr.update(visible=True), header, "", f"loaded in {slot.load_s:.1f} s"]
        else:
            out += [gr.update(visible=True), header, column.text, column.metrics_line()]
    return out


# -- the page ----------------------------------------------------------------------------------
def _model_choices(ctx) -> list[str]:
    return [m.name for m in ctx.manager.list_models() if m.format]


def _backend_choices() -> list[str]:
    from backends.registry import backend_names
    return ["auto", *backend_names()]


def options_help() -> str:
    """Each backend's load options, from its declared capabilities (data, not hand-written text)."""
    from backends.registry import backend_class, backend_names
    lines = []
    for name in backend_names():
        try:
            specs = backend_class(name).capabilities.options
        except BackendError as exc:
            lines.append(f"- **{name}**: unavailable ({exc})")
            continue
        parts = []
        for spec in specs:
            choices = f" ({' / '.join(map(str, spec.choices))})" if spec.choices else ""
            parts.append(f"`{spec.name}`{choices} default `{spec.default}`")
        lines.append(f"- **{name}**: " + ("; ".join(parts) or "no options"))
    return "\n".join(lines)


def build(ctx) -> None:
    manager = ctx.manager
    session = gr.State(CompareSession(), delete_callback=lambda s: s.release(manager))
    gr.Markdown("Load 2 to 4 entries (a model on a backend, with options such as `quant=nf4` for "
                "bitsandbytes), send one prompt to all of them, or **Measure** memory, perplexity and speed. "
                "Entries are loaded for this page only; **Unload** frees them.")
    form = []
    with gr.Group():
        for index in range(MAX_ENTRIES):
            with gr.Row():
                form.append(gr.Dropdown(_model_choices(ctx), value=None, label=f"Entry {index + 1}: model",
                                        elem_id=f"compare-model-{index}", scale=3))
                form.append(gr.Dropdown(_backend_choices(), value="auto", label="backend",
                                        elem_id=f"compare-backend-{index}", scale=1))
                form.append(gr.Textbox(label="options (key=value, ...)", placeholder="quant=nf4",
                                       elem_id=f"compare-options-{index}", scale=2))
    with gr.Accordion("Options each backend accepts", open=False):
        gr.Markdown(options_help())
    with gr.Row():
        load_btn = gr.Button("Load entries", variant="primary", elem_id="compare-load")
        unload_btn = gr.Button("Unload", elem_id="compare-unload")
        refresh_btn = gr.Button("Refresh model list")
    load_status = gr.Dataframe(headers=["entry", "status", "RAM before MB", "RAM after MB", "RAM cost MB",
                                        "load s"], interactive=False, label="Entries", elem_id="compare-status")

    prompt = gr.Textbox(label="Prompt (sent to every entry)", lines=1, max_lines=10, elem_id="compare-prompt",
                        placeholder="Enter sends, Shift+Enter adds a line")
    with gr.Accordion("Sampling (same for every entry)", open=False, elem_id="compare-sampling"):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top_p")
            top_k = gr.Number(value=0, precision=0, label="top_k (0 = off)")
            max_new = gr.Number(value=128, precision=0, label="max new tokens", elem_id="compare-max-new")
            seed = gr.Number(value=0, precision=0, label="seed")
    with gr.Row():
        chat_mode = gr.Checkbox(False, label="Chat: each entry keeps its own conversation",
                                elem_id="compare-chat-mode")
        send_btn = gr.Button("Send to all", variant="primary", elem_id="compare-send")
        stop_btn = gr.Button("Stop", elem_id="compare-stop")
        clear_btn = gr.Button("Clear chat", elem_id="compare-clear")

    column_outputs = []
    with gr.Row(equal_height=False):
        for index in range(MAX_ENTRIES):
            with gr.Column(visible=False, elem_id=f"compare-col-{index}") as col:
                header = gr.Markdown(elem_id=f"compare-header-{index}")
                reply = gr.Textbox(label="reply", lines=8, max_lines=20, interactive=False,
                                   elem_id=f"compare-reply-{index}")
                reply.change(None, None, None, js=FOLLOW_REPLIES_JS, queue=False, api_visibility="private")
                metrics = gr.Markdown(elem_id=f"compare-metrics-{index}", elem_classes=["gen-stats"])
            column_outputs += [col, header, reply, metrics]

    with gr.Accordion("Measure (perplexity, memory, speed)", open=True):
        with gr.Row():
            source = gr.Dropdown(list(TEXT_SOURCES), value="wikitext2", label="perplexity text")
            upload = gr.File(label="text file (.txt / .jsonl)", type="filepath", file_types=[".txt", ".jsonl", ".raw"])
            seqlen = gr.Number(value=512, precision=0, label="seqlen", elem_id="compare-seqlen")
            windows = gr.Number(value=4, precision=0, label="windows (0 = all)", elem_id="compare-windows")
        with gr.Row():
            prompt_tokens = gr.Number(value=128, precision=0, label="speed: prompt tokens", elem_id="compare-prompt-tokens")
            new_tokens = gr.Number(value=32, precision=0, label="speed: new tokens", elem_id="compare-new-tokens")
            repeats = gr.Number(value=3, precision=0, label="speed: repeats (median)", elem_id="compare-repeats")
        measure_btn = gr.Button("Measure", variant="primary", elem_id="compare-measure")
        results_df = gr.Dataframe(headers=core.table_rows([])[0], interactive=False, label="Results",
                                  elem_id="compare-results")
        notes = gr.Markdown(elem_id="compare-notes")
        with gr.Row():
            ppl_plot = gr.ScatterPlot(x="memory MB", y="perplexity", color="entry",
                                      title="Perplexity against memory (lower left is better)", height=340)
            speed_plot = gr.BarPlot(x="bar", y="tokens/s", color="kind", title="Tokens/s per entry",
                                    x_title="entry", x_label_angle=-30, height=340)  # level labels of 8 bars overlap
        exports = gr.File(label="Export (CSV, JSON)", file_count="multiple", interactive=False)

    # -- handlers ----------------------------------------------------------------------------
    def on_load(state: CompareSession, *values, progress=gr.Progress()):
        try:
            entries = entries_from_form(list(values))
        except ValueError as exc:
            raise gr.Error(str(exc))
        if not entries:
            raise gr.Error("pick at least one model")
        with state.lock:
            core.unload_slots(manager, state.slots)
            state.slots = core.load_entries(manager, entries,
                                            lambda f, what: progress(f, desc=what))
            state.histories = [[] for _ in state.slots]
            state.results = []
            slots = list(state.slots)
        return [load_table(slots), *column_updates(slots)]

    def on_unload(state: CompareSession):
        state.release(manager)
        return [load_table([]), *column_updates([])]

    def on_send(state: CompareSession, text, temp, p, k, n_new, seed_value, chat):
        if not state.slots:
            raise gr.Error("load entries first")
        if not (text or "").strip():
            raise gr.Error("type a prompt")
        try:
            params = SamplingParams(temperature=float(temp), top_p=float(p), top_k=int(k or 0),
                                    max_new_tokens=int(n_new or 128),
                                    seed=None if seed_value in (None, "") else int(seed_value)).validated()
        except (BackendError, ValueError) as exc:
            raise gr.Error(str(exc))
        state.stop.clear()
        slots = list(state.slots)
        messages = [{"role": "user", "content": text}]
        histories = state.histories if chat and len(state.histories) == len(slots) else None
        columns = []
        for columns in core.stream_side_by_side(manager, slots, messages, params, state.stop,
                                                histories=histories):
            yield column_updates(slots, columns)
        if histories is not None:
            for history, column in zip(histories, columns):
                if not column.error:
                    history += [*messages, {"role": "assistant", "content": column.text}]

    def on_clear(state: CompareSession):
        state.histories = [[] for _ in state.slots]
        return column_updates(list(state.slots))

    def on_stop(state: CompareSession):
        state.stop.set()

    def on_measure(state: CompareSession, src, file, n_seq, n_win, n_prompt, n_new, n_rep,
                   progress=gr.Progress()):
        if not state.slots:
            raise gr.Error("load entries first")
        if src == "uploaded file" and not file:
            raise gr.Error("upload a text file first")
        try:
            text = core.eval_text(Path(file) if src == "uploaded file" else src)
            settings = core.MeasureSettings(int(n_seq), int(n_win) or None, int(n_prompt), int(n_new),
                                            int(n_rep)).validated()
        except (BackendError, ValueError) as exc:
            raise gr.Error(str(exc))
        state.stop.clear()
        progress(0.0, desc="starting")
        results = core.measure(manager, list(state.slots), text, settings,
                               lambda f, what: progress(f, desc=what), should_stop=state.stop.is_set)
        state.results = results
        memory, speed = plot_frames(results)
        folder = Path(tempfile.mkdtemp(prefix="gptq-webui-compare-"))
        csv_path, json_path = core.write_exports(results, folder, f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        note_lines = core.fairness_notes(results)
        where = "all windows" if settings.windows is None else f"first {settings.windows} windows"
        summary = (f"Perplexity on {src if src != 'uploaded file' else Path(file).name}, seqlen "
                   f"{settings.seqlen}, {where}; speed: {settings.prompt_tokens}-token prompt, "
                   f"{settings.new_tokens} new tokens, greedy, median of {settings.repeats}.")
        return (results_frame(results), "\n\n".join([summary, *note_lines]), memory, speed,
                [str(csv_path), str(json_path)])

    load_btn.click(on_load, [session, *form], [load_status, *column_outputs], concurrency_limit=1)
    unload_btn.click(on_unload, [session], [load_status, *column_outputs])
    refresh_btn.click(lambda: [gr.update(choices=_model_choices(ctx)) for _ in range(MAX_ENTRIES)],
                      None, form[0::3])
    send_inputs = [session, prompt, temperature, top_p, top_k, max_new, seed, chat_mode]
    send_btn.click(on_send, send_inputs, column_outputs)
    prompt.submit(on_send, send_inputs, column_outputs)
    clear_btn.click(on_clear, [session], column_outputs)
    stop_btn.click(on_stop, [session], None, queue=False)
    measure_btn.click(on_measure, [session, source, upload, seqlen, windows, prompt_tokens, new_tokens, repeats],
                      [results_df, notes, ppl_plot, speed_plot, exports], concurrency_limit=1)
