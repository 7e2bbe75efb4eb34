"""Command line, page assembly and server start.

Tabs are modules listed in TABS; each exposes `TITLE` and `build(ctx)` and is built inside its own
`gr.Tab`. Adding a tab is one line here."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

# Before gradio is imported: no analytics, no version check, nothing leaves the machine at start.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TABS = (
    "webui.chat_tab",
    "webui.models_tab",
    "webui.quantize_tab",
    "webui.compare_tab",
)

_CSS = """
#chat-stats { font-size: 0.85em; opacity: 0.8; }
.gen-stats { font-size: 0.8em; opacity: 0.7; }
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from webui.context import DEFAULT_MODELS_DIR, default_data_dir

    parser = argparse.ArgumentParser(prog="python -m webui",
                                     description="gptq-webui: chat with, quantize and compare local LLMs.")
    parser.add_argument("--listen", action="store_true",
                        help="serve on 0.0.0.0 (all interfaces); needs --auth unless --insecure")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login for the page and API")
    parser.add_argument("--insecure", action="store_true",
                        help="allow --listen without --auth (anyone on the network can use the models)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("GPTQ_WEBUI_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on the OpenAI API under /v1 "
                             "(default $GPTQ_WEBUI_API_KEY; needed with --listen unless --insecure)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--model", metavar="NAME", help="model under the models folder to load at start")
    parser.add_argument("--backend", metavar="NAME",
                        help="backend for --model and the Models tab default (default: detected from the format)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help=f"models folder (default {DEFAULT_MODELS_DIR})")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"user data folder: history, presets (default $GPTQ_WEBUI_DATA or {default_data_dir()})")
    args = parser.parse_args(argv)
    if args.listen and not args.auth and not args.insecure:
        parser.error("--listen serves on every network interface: add --auth user:password "
                     "(or --insecure if you really want an open server)")
    if args.listen and not args.api_key and not args.insecure:
        parser.error("--listen also serves the OpenAI API under /v1: add --api-key KEY "
                     "(or --insecure if you really want an open server)")
    if args.api_key is not None and (len(args.api_key) < 8 or not args.api_key.isprintable() or " " in args.api_key):
        parser.error("--api-key must be at least 8 printable characters without spaces")
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like user:password (both non-empty)")
        args.auth = (user, password)
    if not (1 <= args.port <= 65535):
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.backend:
        from backends.registry import backend_names
        if args.backend not in backend_names():
            parser.error(f"unknown backend {args.backend!r}; available: {', '.join(backend_names())}")
    return args


def theme():
    """System fonts only: the default theme would make every browser fetch Google Fonts."""
    import gradio as gr
    return gr.themes.Soft(font=("ui-sans-serif", "system-ui", "sans-serif"),
                          font_mono=("ui-monospace", "SFMono-Regular", "monospace"))


def build_app(ctx, tabs: tuple[str, ...] = TABS):
    """The whole page: one gr.Tab per module in `tabs`."""
    import gradio as gr

    with gr.Blocks(title="gptq-webui", analytics_enabled=False) as demo:
        tab_ctx = dataclasses.replace(ctx, blocks=demo)
        for module_name in tabs:
            module = importlib.import_module(module_name)
            with gr.Tab(module.TITLE, id=module_name.rsplit(".", 1)[-1],
                        elem_id=f"tab-{module.TITLE.lower()}") as tab:
                module.build(tab_ctx)
            if getattr(module, "ON_SHOW_JS", None):           # page-side work when the tab comes into view
                tab.select(None, None, None, js=module.ON_SHOW_JS, queue=False, api_visibility="private")
    return demo


# Gradio's queue looks for new events every 1 ms and for progress every 10 ms while idle: 3.6% of a core with
# no page open, and 2.5% slower replies on a 2-core CPU (bench/RESULTS.md, "Server overhead"). 10 ms before an event
# starts is not felt in a page.
QUEUE_POLL_S = 0.01
PROGRESS_POLL_S = 0.05


def relax_queue_polling(demo) -> None:
    """Set Gradio's idle polling intervals. They are private attributes of its Queue: if a Gradio release
    moves them the server still runs (as before, busier) and test_ui_server says so."""
    queue = getattr(demo, "_queue", None)
    for name, seconds in (("sleep_when_free", QUEUE_POLL_S), ("progress_update_sleep_when_free", PROGRESS_POLL_S)):
        if isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, max(getattr(queue, name), seconds))


def launch(demo, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           block: bool = True, routes: list | None = None):
    """`routes`: extra Starlette routes served first by the same server (the OpenAI API at /v1)."""
    from webui.security import DEFAULT_MAX_UPLOAD_BYTES
    demo.queue(default_concurrency_limit=4)
    relax_queue_polling(demo)
    demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=True, quiet=True,
                show_error=True, share=False, ssr_mode=False, theme=theme(), css=_CSS,
                max_file_size=DEFAULT_MAX_UPLOAD_BYTES, app_kwargs={"routes": list(routes or [])})
    if block:
        demo.block_thread()
    return demo


class _Loader(threading.Thread):
    """Loads the --model in the background so the UI import and build overlap with it."""

    def __init__(self, ctx, name: str, backend: str | None):
        super().__init__(name="load-at-start", daemon=True)
        self.ctx, self.model, self.backend, self.error = ctx, name, backend, None

    def run(self):
        from backends.base import BackendError
        started = time.perf_counter()
        try:
            model_id = self.ctx.manager.load(self.model, self.backend)
        except BackendError as exc:
            self.error = str(exc)
            return
        except Exception as exc:  # whatever happens, main() reports it and exits cleanly
            self.error = f"{type(exc).__name__}: {exc}"
            return
        print(f"gptq-webui: loaded {model_id} in {time.perf_counter() - started:.1f} s", flush=True)


def _start_loading(ctx, name: str, backend: str | None) -> _Loader:
    print(f"gptq-webui: loading {name} ...", flush=True)
    loader = _Loader(ctx, name, backend)
    loader.start()
    return loader


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None. Checked before a model load that can take
    minutes; bound as uvicorn binds (SO_REUSEADDR), so a port a stopped server just left is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "another program (another gptq-webui?) is listening there"
            if exc.errno == errno.EACCES:
                return "permission denied (ports below 1024 need root)"
            return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl+C or SIGTERM (what service managers and `docker stop` send): either closes the server
    and unloads the models; one during startup stops it with a line (exit status 130), not a traceback."""
    args = parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return _serve(args)
    except KeyboardInterrupt:
        print("gptq-webui: stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        if previous is not None:  # a caller embedding main() gets its own handler back
            signal.signal(signal.SIGTERM, previous)


def _serve(args) -> int:
    from webui.context import AppContext

    ctx = AppContext.create(args.models_dir, args.data_dir, args.backend)
    print(f"gptq-webui: models folder {ctx.models_dir}", flush=True)
    print(f"gptq-webui: user data folder {ctx.data_dir}", flush=True)
    if args.model:  # a wrong name fails here, in a second, before gradio or torch are imported
        from backends.base import BackendError
        from backends.registry import detect_format
        try:
            detect_format(ctx.manager.resolve_path(args.model))
        except BackendError as exc:
            print(f"gptq-webui: cannot load {args.model}: {exc}", file=sys.stderr)
            return 2
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    problem = port_problem(host, args.port)
    if problem:
        print(f"gptq-webui: cannot serve on port {args.port}: {problem}. Pick another with --port.", file=sys.stderr)
        return 2
    loader = _start_loading(ctx, args.model, args.backend) if args.model else None
    # uploads land under the user data folder (size-limited in launch), not in a shared /tmp/gradio
    from webui.security import uploads_dir
    os.environ.setdefault("GRADIO_TEMP_DIR", str(uploads_dir(ctx.data_dir)))
    demo = build_app(ctx)  # imports gradio and builds the page while the model loads
    if loader is not None:
        loader.join()
        if loader.error:
            print(f"gptq-webui: cannot load {args.model}: {loader.error}", file=sys.stderr)
            return 2
    try:
        from webui.api import api_routes
        launch(demo, host, args.port, args.auth, block=False,
               routes=api_routes(ctx, args.api_key, local_only=not args.listen))
    except OSError as exc:
        print(f"gptq-webui: cannot serve on port {args.port}: {exc}. Pick another with --port.", file=sys.stderr)
        return 2
    shown = "127.0.0.1" if host == "127.0.0.1" else f"{host} (all interfaces)"
    try:
        print("", flush=True)
        print(f"  gptq-webui is running on {shown}: open  http://127.0.0.1:{args.port}", flush=True)
        print(f"  OpenAI-compatible API: http://127.0.0.1:{args.port}/v1"
              f" ({'needs the --api-key' if args.api_key else 'no API key'})", flush=True)
        print("  Press Ctrl+C to stop.", flush=True)
        print("", flush=True)
        demo.block_thread()  # returns on Ctrl+C or SIGTERM, having closed the server
    except KeyboardInterrupt:
        pass
    finally:
        demo.close(verbose=False)  # the server and queue, also when the stop came before block_thread
        ctx.manager.unload_all()
    print("gptq-webui: stopped", flush=True)
    return 0
