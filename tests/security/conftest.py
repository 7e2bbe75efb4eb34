"""A models folder full of hostile things next to two good models (hard links of the default model, so
nothing big is copied), and a real API server over it with the good GGUF loaded."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.net import free_port

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HOSTILE_TEMPLATE = ("{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}"
                    "{% for m in messages %}{{ m['content'] }}{% endfor %}")


class PickleBomb:
    """Unpickling this runs a command that creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def link_files(src: Path, dst: Path, names=None, skip=()) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and (names is None or path.name in names) and path.name not in skip:
            try:
                os.link(path, dst / path.name)
            except OSError:                       # another filesystem: copy (small files only here)
                shutil.copy2(path, dst / path.name)


@dataclass
class Hostile:
    root: Path
    models: Path
    outside: Path
    marker: Path            # created only if a pickle is loaded or a template reaches os


def build_hostile_models(root: Path, hf: Path, gguf: Path, gptq: Path) -> Hostile:
    models, outside = root / "models", root / "outside"
    models.mkdir()
    outside.mkdir()
    marker = root / "PWNED"
    link_files(hf, models / "good-hf")
    os.link(gguf, models / "good.gguf")
    link_files(gptq, models / "good-gptq")

    # truncated safetensors: header intact, data cut after 4 MiB
    link_files(hf, models / "truncated-safetensors", skip=("model.safetensors",))
    with open(hf / "model.safetensors", "rb") as src:
        (models / "truncated-safetensors" / "model.safetensors").write_bytes(src.read(4 * 2**20))
    # safetensors whose header claims to be enormous
    link_files(hf, models / "bad-header-safetensors", skip=("model.safetensors",))
    (models / "bad-header-safetensors" / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    # GGUF files: random bytes, right magic then garbage, empty, cut in half
    (models / "garbage.gguf").write_bytes(bytes(range(256)) * 64)
    (models / "magic-then-garbage.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4096)
    (models / "empty.gguf").write_bytes(b"")
    with open(gguf, "rb") as src:
        (models / "truncated.gguf").write_bytes(src.read(2 * 2**20))
    # no tokenizer
    link_files(hf, models / "missing-tokenizer", names=("config.json", "model.safetensors", "generation_config.json"))
    # pickle weights only, and pickle files offered as models
    (models / "pickle-weights").mkdir()
    shutil.copy2(hf / "config.json", models / "pickle-weights" / "config.json")
    link_files(hf, models / "pickle-weights", names=TOKENIZER_FILES)
    bomb = pickle.dumps(PickleBomb(marker))
    (models / "pickle-weights" / "pytorch_model.bin").write_bytes(bomb)
    (models / "evil.pt").write_bytes(bomb)
    (models / "evil.pkl").write_bytes(bomb)
    # GPTQ checkpoints with a config that lies: bits 5, and a group size the tensors do not have
    for name, change in (("gptq-bits-5", {"bits": 5}), ("gptq-wrong-group-size", {"group_size": 32})):
        folder = models / name
        link_files(gptq, folder, skip=("config.json", "quantize_config.json"))
        qc = json.loads((gptq / "quantize_config.json").read_text())
        config = json.loads((gptq / "config.json").read_text())
        qc.update(change)
        config["quantization_config"].update(change)
        (folder / "quantize_config.json").write_text(json.dumps(qc))
        (folder / "config.json").write_text(json.dumps(config))
    # a chat template that tries to reach os through Python internals
    link_files(hf, models / "hostile-template", skip=("chat_template.jinja", "tokenizer_config.json"))
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (models / "hostile-template" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (models / "hostile-template" / "chat_template.jinja").write_text(HOSTILE_TEMPLATE.replace("MARKER", str(marker)))
    # a model that ships Python code (auto_map): it must not run unless the user opts in
    folder = models / "remote-code"
    link_files(hf, folder, skip=("config.json", "tokenizer_config.json"))
    config = json.loads((hf / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    # symlinks that leave the models folder (to a valid model, so only the confinement refuses them)
    os.link(gguf, outside / "valid.gguf")
    link_files(hf, outside / "valid-hf")
    (models / "link-out.gguf").symlink_to(outside / "valid.gguf")
    (models / "link-out-folder").symlink_to(outside / "valid-hf")
    (models / "link-to-etc").symlink_to("/etc")
    return Hostile(root, models, outside, marker)


@pytest.fixture(scope="session")
def gptq_checkpoint(default_hf_model, tmp_path_factory) -> Path:
    """A real 4-bit RTN GPTQ checkpoint of the default model (group size 128), via the gptq module."""
    from backends.gptq.rtn import quantize_folder
    return quantize_folder(default_hf_model, tmp_path_factory.mktemp("gptq") / "smollm2-rtn-4bit", bits=4,
                           group_size=128)


@pytest.fixture(scope="session")
def hostile(tmp_path_factory, default_hf_model, default_gguf, gptq_checkpoint) -> Hostile:
    return build_hostile_models(tmp_path_factory.mktemp("hostile"), default_hf_model, default_gguf, gptq_checkpoint)



@dataclass
class ApiOnlyServer:
    ctx: object
    port: int
    good_id: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self):
        from openai import OpenAI
        return OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def hostile_server(hostile, tmp_path_factory):
    """The /v1 app alone under uvicorn (no page: these tests are about the engines and the API)."""
    import uvicorn
    from webui.api import create_api_app
    from webui.context import AppContext
    from starlette.applications import Starlette
    from starlette.routing import Mount

    ctx = AppContext.create(models_dir=hostile.models, data_dir=tmp_path_factory.mktemp("hostile-data"))
    good_id = ctx.manager.load("good.gguf", "llama.cpp", {"n_ctx": 2048, "n_threads": 1})
    app = Starlette(routes=[Mount("/v1", app=create_api_app(ctx))])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the API server did not start"
    yield ApiOnlyServer(ctx, port, good_id)
    server.should_exit = True
    thread.join(10)
    ctx.manager.unload_all()
