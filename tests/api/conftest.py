"""One real gptq-webui server (Gradio page + OpenAI API on the same port, API key required) with the
default model on the transformers backend (fp32, CPU), shared by every API test."""
from __future__ import annotations

import pytest

from apitools import API_KEY, DEFAULT_NAME, ApiServer
from tests.net import free_port


@pytest.fixture(scope="session")
def api_server(default_hf_model, models_dir, tmp_path_factory):
    from webui.api import api_routes
    from webui.app import build_app, launch
    from webui.context import AppContext

    ctx = AppContext.create(models_dir=models_dir, data_dir=tmp_path_factory.mktemp("api-data"))
    ctx.manager.load(DEFAULT_NAME, "transformers", {"dtype": "float32", "device": "cpu"})
    routes = api_routes(ctx, API_KEY)
    demo = build_app(ctx)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False, routes=routes)
    server = ApiServer(ctx, demo, routes[0].app.state.api, port)
    yield server
    demo.close()
    ctx.manager.unload_all()


@pytest.fixture
def client(api_server):
    return api_server.client()
