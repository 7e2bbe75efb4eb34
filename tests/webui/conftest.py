"""A real gptq-webui server on a free port, with the default model loaded on the transformers
backend (fp32, CPU), shared by the gradio_client and browser tests of this folder."""
from __future__ import annotations


import pytest
from tests.net import free_port

DEFAULT_NAME = "SmolLM2-135M-Instruct"



class Server:
    def __init__(self, ctx, demo, port: int):
        self.ctx, self.demo, self.port = ctx, demo, port
        self.url = f"http://127.0.0.1:{port}/"

    def client(self):
        from gradio_client import Client
        return Client(self.url, verbose=False, download_files=False)


def start_server(models_dir, data_dir, load: str | None = None) -> Server:
    from webui.app import build_app, launch
    from webui.context import AppContext

    ctx = AppContext.create(models_dir=models_dir, data_dir=data_dir)
    if load:
        ctx.manager.load(load, "transformers", {"dtype": "float32", "device": "cpu"})
    demo = build_app(ctx)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    return Server(ctx, demo, port)


@pytest.fixture(scope="session")
def webui_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("webui-data")


@pytest.fixture(scope="session")
def chat_server(default_hf_model, models_dir, webui_data_dir):
    server = start_server(models_dir, webui_data_dir, load=DEFAULT_NAME)
    yield server
    server.demo.close()
    server.ctx.manager.unload_all()


@pytest.fixture(scope="session")
def bad_models_server(tmp_path_factory):
    """A server whose models folder holds only broken things: no model is loaded on it."""
    models = tmp_path_factory.mktemp("bad-models")
    (models / "corrupt.gguf").write_bytes(b"GGUF" + b"\x00\xff" * 64)
    (models / "empty-folder").mkdir()
    (models / "notes.txt").write_text("not a model")
    (models / "bad-config").mkdir()
    (models / "bad-config" / "config.json").write_text("{oops")
    (models / "fake-weights").mkdir()
    (models / "fake-weights" / "config.json").write_text('{"model_type": "llama"}')
    (models / "fake-weights" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    server = start_server(models, tmp_path_factory.mktemp("bad-data"))
    yield server
    server.demo.close()
