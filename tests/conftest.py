"""Shared fixtures: a tiny random LLaMA, the real default model (set up by `./start.sh test` / `python -m webui.default_model`)
and the shared data folder. Tests that need data skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
DEFAULT_HF = MODELS_DIR / "SmolLM2-135M-Instruct"
DEFAULT_GGUF = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA = Path(os.environ.get("GPTQ_WEBUI_SHARED", REPO.parent / "shared")) / "data"
ARTIFACTS = REPO / "tests" / "artifacts"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")
    config.addinivalue_line("markers", "browser: drives a real Chromium through Playwright")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def tiny_llama():
    """A random 2-layer LLaMA (GQA, 320 tokens) for tests of decoding paths: built fresh per test, so a
    test may route or fuse its modules in place."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def tokenizer_folder() -> Path:
    """The default model's tokenizer files, or on a GPU machine without models/ the copy bench/gpu_session.sh
    carries (GPTQ_WEBUI_TOKENIZER)."""
    for folder in (DEFAULT_HF, Path(os.environ.get("GPTQ_WEBUI_TOKENIZER", DEFAULT_HF))):
        if (folder / "tokenizer.json").is_file():
            return folder
    pytest.fail(f"no tokenizer.json in {DEFAULT_HF}: run `python -m webui.default_model` first")


def save_random_llama(folder: Path, **config) -> Path:
    """A random fp16 LLaMA (seed 0) saved with the default model's tokenizer files: a real-looking model
    folder for tests on a GPU machine, which carries only the tokenizer."""
    import shutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).half().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_folder() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS_DIR


@pytest.fixture(scope="session")
def default_hf_model() -> Path:
    if not (DEFAULT_HF / "model.safetensors").exists():
        pytest.fail(f"default model missing at {DEFAULT_HF}: run `python -m webui.default_model` first")
    return DEFAULT_HF


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    if not DEFAULT_GGUF.exists():
        pytest.fail(f"default GGUF missing at {DEFAULT_GGUF}: run `python -m webui.default_model` first")
    return DEFAULT_GGUF


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set GPTQ_WEBUI_SHARED)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wikitext_path(shared_data) -> Path:
    path = shared_data / "wikitext2" / "wiki.test.raw"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def c4_path(shared_data) -> Path:
    path = shared_data / "c4" / "c4-train-first1000.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def transformers_backend(default_hf_model):
    """The default model on the transformers backend, fp32 on CPU, loaded once per session."""
    from backends.registry import create_backend
    backend = create_backend("transformers")
    backend.load(default_hf_model, backend.validate_options({"dtype": "float32", "device": "cpu"}))
    yield backend
    backend.unload()


@pytest.fixture(scope="session")
def llamacpp_backend(default_gguf):
    from backends.registry import create_backend
    backend = create_backend("llama.cpp")
    backend.load(default_gguf, backend.validate_options({"n_ctx": 2048, "n_threads": 1}))
    yield backend
    backend.unload()
