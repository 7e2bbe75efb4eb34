"""Models tab: what is in the models folder, loading it with a chosen backend and options (the form
is built from each backend's declared OptionSpecs), unloading, memory per loaded model, and
downloading from the Hugging Face Hub. Every bad input ends as a sentence in the status box."""
import logging

import gradio as gr

from backends.base import BackendError, OptionSpec
from backends.registry import backend_class, backend_names, backends_for_format, detect_format
from webui.hub_download import DownloadError, download

log = logging.getLogger(__name__)

TITLE = "Models"
AUTO = "auto"
MODEL_HEADERS = ["name", "format", "weights", "size (MB)", "status"]
LOADED_HEADERS = ["model id", "backend", "RAM (MB)", "GPU (MB)", "file (MB)", "bits/weight", "load (s)"]


def option_component(backend: str, spec: OptionSpec):
    """One form field for one OptionSpec; the kind decides the widget."""
    elem_id = f"opt-{backend}-{spec.name}".replace(".", "")
    label = spec.name
    info = spec.help or None
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default, label=label, info=info, elem_id=elem_id)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), label=label, info=info, elem_id=elem_id)
    if spec.kind in ("int", "float"):
        return gr.Number(spec.default, label=label, info=info, elem_id=elem_id,
                         precision=0 if spec.kind == "int" else None,
                         minimum=spec.minimum, maximum=spec.maximum)
    return gr.Textbox("" if spec.default is None else str(spec.default), label=label, info=info, elem_id=elem_id)


class ModelsTab:
    def __init__(self, ctx):
        self.ctx = ctx
        self.backends = backend_names()
        self.specs: dict[str, tuple[OptionSpec, ...]] = {}
        self.unavailable: dict[str, str] = {}
        for name in self.backends:
            try:
                self.specs[name] = backend_class(name).capabilities.options
            except BackendError as exc:  # e.g. the engine's Python package is missing
                self.unavailable[name] = str(exc)
        self.field_keys: list[tuple[str, str]] = []  # (backend, option) of each form field, in order
        self.fields: list = []

    # data for the tables
    @staticmethod
    def models_rows(entries) -> list[list]:
        return [[e.name, e.format or "-", e.weights, e.size_mb, "ok" if e.problem is None else e.problem]
                for e in entries]

    @staticmethod
    def loadable_names(entries) -> list[str]:
        return [e.name for e in entries if e.format is not None]

    def loaded_rows(self) -> list[list]:
        rows = []
        for m in self.ctx.manager.loaded():
            try:
                report = m.backend.memory_report()
                mem = [round(report.ram_mb, 1), round(report.gpu_mb, 1), round(report.file_mb, 1),
                       None if report.bits_per_weight is None else round(report.bits_per_weight, 2)]
            except Exception as exc:  # a report must never break the page
                log.warning("memory report of %s failed: %s", m.model_id, exc)
                mem = [None, None, None, None]
            rows.append([m.model_id, m.backend_name, *mem, round(m.load_seconds, 1)])
        return rows

    def refresh(self, current_name: str | None = None, current_loaded: str | None = None):
        """The tables and pickers again. The unload picker keeps its model while it is loaded, else
        shows the newest one, so a page opened on a loaded model can unload it in one click."""
        entries = self.ctx.manager.list_models()  # one walk of the folder for both
        loaded_ids = self.ctx.manager.loaded_ids()
        pick = current_loaded if current_loaded in loaded_ids else (loaded_ids[-1] if loaded_ids else None)
        return (self.models_rows(entries),
                gr.update(choices=self.loadable_names(entries), value=current_name if current_name else None),
                *self._loaded_updates(pick))

    def pick_row(self, evt: gr.SelectData):
        """Clicking a row of the models table picks that model for loading."""
        names = [e.name for e in self.ctx.manager.list_models()]
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if isinstance(row, int) and 0 <= row < len(names):
            return gr.update(value=names[row])
        return gr.update()

    def pick_loaded_row(self, evt: gr.SelectData):
        ids = self.ctx.manager.loaded_ids()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return gr.update(value=ids[row]) if isinstance(row, int) and 0 <= row < len(ids) else gr.update()

    # backend choice and option form
    def effective_backend(self, name: str | None, backend: str | None) -> str | None:
        """The backend a load would use: the chosen one, or for "auto" the --backend default when it
        fits the format, else the format's preferred backend."""
        if backend and backend != AUTO:
            return backend
        if not name:
            return self.ctx.default_backend
        try:
            fmt = detect_format(self.ctx.manager.resolve_path(name))
        except BackendError:
            return None
        allowed = backends_for_format(fmt)
        if self.ctx.default_backend in allowed:
            return self.ctx.default_backend
        return allowed[0] if allowed else None

    def show_options(self, name: str | None, backend: str | None):
        chosen = self.effective_backend(name, backend)
        return [gr.update(visible=b == chosen) for b in self.specs]

    def load(self, name: str | None, backend: str | None, *values):
        """Load and report; every failure is a sentence in the status box, never a dead server."""
        name = (name or "").strip()
        if not name:
            gr.Warning("Pick a model first.")
            return "Pick a model from the list first.", *self._loaded_updates()
        chosen = self.effective_backend(name, backend)
        options = {opt: value for (b, opt), value in zip(self.field_keys, values) if b == chosen}
        try:
            model_id = self.ctx.manager.load(name, chosen, options)
        except BackendError as exc:
            gr.Warning(f"Could not load {name}: {exc}")
            return f"**Could not load {name}:** {exc}", *self._loaded_updates()
        except Exception as exc:  # keep serving whatever an engine throws
            log.exception("loading %s failed", name)
            gr.Warning(f"Could not load {name}: {type(exc).__name__}: {exc}")
            return f"**Could not load {name}:** {type(exc).__name__}: {exc}", *self._loaded_updates()
        loaded = self.ctx.manager.get(model_id)
        notes = "".join(f"\n\nNote: {w}" for w in loaded.backend.load_warnings)
        return (f"Loaded **{model_id}** in {loaded.load_seconds:.1f} s. Chat with it in the Chat tab.{notes}",
                *self._loaded_updates(model_id))

    def _loaded_updates(self, selected: str | None = None):
        return self.loaded_rows(), gr.update(choices=self.ctx.manager.loaded_ids(), value=selected)

    def unload(self, model_id: str | None):
        if not model_id:
            gr.Warning("Pick a loaded model first.")
            return "Pick a loaded model first.", *self._loaded_updates()
        try:
            self.ctx.manager.unload(model_id)
        except BackendError as exc:
            gr.Warning(str(exc))
            return f"**Could not unload:** {exc}", *self._loaded_updates()
        return f"Unloaded {model_id}.", *self._loaded_updates()

    def download(self, repo_id: str, filename: str, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc=f"Contacting the Hub for {repo_id}")
        try:
            path = download(repo_id, self.ctx.models_dir, filename=filename or "")
        except DownloadError as exc:
            gr.Warning(str(exc))
            return f"**Download failed:** {exc}", *self.refresh()[:2]
        return f"Downloaded to {path}. Load it above.", *self.refresh(path.name)[:2]

    # layout
    def build(self) -> None:
        ctx = self.ctx
        entries = ctx.manager.list_models()
        names = self.loadable_names(entries)
        with gr.Row():
            with gr.Column(scale=3):
                models_table = gr.Dataframe(self.models_rows(entries), headers=MODEL_HEADERS, interactive=False,
                                            label=f"Models in {ctx.models_dir}", elem_id="models-table",
                                            wrap=True, column_widths=["33%", "10%", "24%", "12%", "21%"])
                refresh = gr.Button("↻ Refresh", elem_id="models-refresh", size="sm")
            with gr.Column(scale=2):
                name = gr.Dropdown(names, value=None, label="Model", allow_custom_value=True,
                                   elem_id="models-name",
                                   info="a folder or .gguf file inside the models folder")
                default = ctx.default_backend if ctx.default_backend in self.specs else AUTO
                backend = gr.Dropdown([AUTO, *self.specs], value=default, label="Backend",
                                      elem_id="models-backend", info="auto: picked from the model's format")
                groups = []
                for b, specs in self.specs.items():
                    with gr.Group(visible=b == default, elem_id=f"opts-{b}".replace(".", "")) as group:
                        gr.Markdown(f"**{b} options**")
                        for spec in specs:
                            self.fields.append(option_component(b, spec))
                            self.field_keys.append((b, spec.name))
                    groups.append(group)
                if self.unavailable:
                    gr.Markdown("\n".join(f"- {b}: unavailable ({why})" for b, why in self.unavailable.items()))
                load = gr.Button("Load", variant="primary", elem_id="models-load")
        status = gr.Markdown("", elem_id="models-status")
        loaded_table = gr.Dataframe(self.loaded_rows(), headers=LOADED_HEADERS, interactive=False,
                                    label="Loaded models (memory)", elem_id="loaded-table")
        with gr.Row():
            loaded_ids = ctx.manager.loaded_ids()
            loaded_pick = gr.Dropdown(loaded_ids, value=loaded_ids[-1] if loaded_ids else None,
                                      label="Loaded model", scale=3,
                                      elem_id="models-loaded-picker", allow_custom_value=True)
            unload = gr.Button("Unload", variant="stop", elem_id="models-unload", scale=1)
        with gr.Accordion("Download from the Hugging Face Hub", open=False, elem_id="hub-download-box"):
            with gr.Row():
                repo = gr.Textbox(label="Repo id", placeholder="HuggingFaceTB/SmolLM2-360M-Instruct",
                                  elem_id="hub-repo", scale=3)
                file = gr.Textbox(label="Single file (optional)", placeholder="model.Q4_K_M.gguf",
                                  elem_id="hub-file", scale=2)
            fetch = gr.Button("Download", elem_id="hub-download")
            hub_status = gr.Markdown("", elem_id="hub-status")

        table_outputs = [models_table, name, loaded_table, loaded_pick]
        refresh.click(self.refresh, name, table_outputs, api_name="list_models")
        models_table.select(self.pick_row, None, name, queue=False, api_visibility="private")
        loaded_table.select(self.pick_loaded_row, None, loaded_pick, queue=False, api_visibility="private")
        name.change(self.show_options, [name, backend], groups, queue=False, api_visibility="private")
        backend.change(self.show_options, [name, backend], groups, queue=False, api_visibility="private")
        load.click(self.load, [name, backend, *self.fields], [status, loaded_table, loaded_pick],
                   api_name="load_model")
        unload.click(self.unload, loaded_pick, [status, loaded_table, loaded_pick], api_name="unload_model")
        fetch.click(self.download, [repo, file], [hub_status, models_table, name], api_name="download_model")
        if ctx.blocks is not None:
            ctx.blocks.load(self.refresh, [name, loaded_pick], table_outputs, queue=False,
                            api_visibility="private")


def build(ctx) -> None:
    ModelsTab(ctx).build()
