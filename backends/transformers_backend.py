"""Hugging Face transformers engine (fp32/fp16/bf16 on CPU or CUDA). Designed to be subclassed:
bitsandbytes and gptq reuse its tokenizer, chat template, generation loop and log-probs and only
override how the model object is built (`_build_model`)."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from backends.base import (Backend, BackendError, Capabilities, GenerationChunk, MemoryReport,
                           OptionSpec, SamplingParams, TokenScore)
from backends import torch_generation
from backends.process_memory import release_memory
from backends.registry import read_model_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


class TransformersBackend(Backend):
    name = "transformers"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        dtypes=("float32", "float16", "bfloat16"),
        formats=("hf",),
        options=(
            OptionSpec("dtype", "choice", "auto", ("auto", "float32", "float16", "bfloat16"),
                       "auto: float16 on CUDA, float32 on CPU"),
            OptionSpec("device", "choice", "auto", ("auto", "cpu", "cuda"), "auto: CUDA when present"),
            OptionSpec("device_map", "choice", "none", ("none", "auto"),
                       "auto: let accelerate spread layers over GPU and CPU (models larger than the GPU)"),
            OptionSpec("threads", "int", 0, help="CPU threads for torch (0 = torch's default)", minimum=0),
            OptionSpec("trust_remote_code", "bool", False, help="run Python code shipped with the model"),
        ),
    )

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.path: Path | None = None
        self.options: dict = {}
        self.device = torch.device("cpu")

    # -- lifecycle -------------------------------------------------------------------------
    def _resolve_device(self, options: dict) -> torch.device:
        wanted = options.get("device", "auto")
        if wanted == "cuda" and not cuda_available():
            raise BackendError("device cuda was asked for but no CUDA GPU is available")
        if wanted == "auto":
            wanted = "cuda" if cuda_available() else "cpu"
        return torch.device(wanted)

    def _resolve_dtype(self, options: dict) -> torch.dtype:
        name = options.get("dtype", "auto")
        if name == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return _DTYPES[name]

    def load(self, path: Path, options: dict) -> None:
        from transformers import AutoTokenizer
        self.path, self.options = Path(path), dict(options)
        _check_hf_folder(self.path)
        self.device = self._resolve_device(options)
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        trust = bool(options.get("trust_remote_code", False))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=trust)
        except Exception as exc:
            raise BackendError(f"{self.path.name}: could not load the tokenizer ({type(exc).__name__}: {exc})") from None
        self.model = self._build_model(self.path, options)
        self.model.eval()

    def _build_model(self, path: Path, options: dict):
        """Subclasses override this to build a quantized model; the rest of the class is shared."""
        from transformers import AutoModelForCausalLM
        kwargs = dict(dtype=self._resolve_dtype(options), trust_remote_code=bool(options.get("trust_remote_code")),
                      use_safetensors=True)
        if options.get("device_map") == "auto":
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if options.get("device_map") != "auto":
            model.to(self.device)
        else:
            self.device = next(model.parameters()).device
        return model

    def unload(self) -> None:
        """Frees the model before it returns. A model holds reference cycles (transformers modules,
        compiled graphs), so dropping it frees its memory only when Python's cyclic collector next runs,
        which can be minutes later: an H100 still held 560-670 MB of a 1.2 GB model after Unload. So
        collect now, then hand CUDA's cached blocks back, so the next load (say the second model of a
        perplexity comparison) finds the memory free."""
        self.model = None
        self.tokenizer = None
        release_memory()
        if cuda_available():
            torch.cuda.empty_cache()

    def _require(self):
        if self.model is None:
            raise BackendError("the model is not loaded")

    # -- reports ---------------------------------------------------------------------------
    def _tensors(self):
        """Every tensor the model holds; engines with state outside parameters and buffers
        (quantization state, kernel copies) extend this and the report counts each storage once."""
        yield from self.model.parameters()
        yield from self.model.buffers()

    def memory_report(self) -> MemoryReport:
        self._require()
        ram = gpu = 0
        seen = set()
        for tensor in self._tensors():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            size = tensor.numel() * tensor.element_size()
            if tensor.device.type == "cuda":
                gpu += size
            else:
                ram += size
        return MemoryReport(ram_mb=ram / 2**20, gpu_mb=gpu / 2**20,
                            file_mb=_weights_size(self.path) / 2**20,
                            bits_per_weight=self.bits_per_weight())

    def bits_per_weight(self) -> float:
        """Bits per weight of the decoder's linear layers as held in memory."""
        return float(torch.finfo(self.model.dtype).bits)

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        self._require()
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        self._require()
        return self.tokenizer.decode(list(ids), skip_special_tokens=not special)

    def check_token_ids(self, ids: Sequence[int]) -> None:
        self._require()
        torch_generation.check_token_ids(self.model, ids)

    @property
    def context_length(self) -> int:
        self._require()
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def chat_template(self) -> str | None:
        self._require()
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        return template

    def special_tokens(self) -> dict:
        self._require()
        return {"bos_token": self.tokenizer.bos_token, "eos_token": self.tokenizer.eos_token}

    # -- generation ------------------------------------------------------------------------
    def generate_ids(self, ids: Sequence[int], params: SamplingParams,
                     stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        self._require()
        yield from torch_generation.stream_generate(
            self.model, [int(t) for t in ids], params, eos_ids=torch_generation.eos_ids(self.model, self.tokenizer),
            decode=self.detokenize, device=self.device, context_length=self.context_length, stop_event=stop_event,
            forward=self._forward_step())

    def _forward_step(self):
        """Subclasses with their own decoding step (static cache, CUDA graphs) override this."""
        return None

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        self._require()
        return torch_generation.token_logprobs(self.model, ids, self.device)

    def score_tokens(self, ids: Sequence[int], top: int = 0, next_token: bool = False) -> list[TokenScore]:
        self._require()
        if len(ids) > self.context_length:
            raise BackendError(f"{len(ids)} tokens exceed the context of {self.context_length}")
        return torch_generation.score_tokens(self.model, ids, self.device, top, next_token)

    def is_end_of_generation(self, token: int) -> bool:
        self._require()
        return int(token) in torch_generation.eos_ids(self.model, self.tokenizer)


def _check_hf_folder(path: Path) -> None:
    if not path.is_dir():
        raise BackendError(f"{path.name} is not a folder")
    config = path / "config.json"
    if not config.exists():
        raise BackendError(f"{path.name} has no config.json")
    read_model_config(path)
    if not any(path.glob("*.safetensors")):
        raise BackendError(f"{path.name} has no .safetensors weights (pickle .bin/.pt files are refused)")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise BackendError(f"{path.name} has no tokenizer files (tokenizer.json / tokenizer.model)")
    for shard in path.glob("*.safetensors"):
        _check_safetensors_header(shard)


def _check_safetensors_header(shard: Path) -> None:
    """Catch a truncated or corrupt shard up front with a clear message instead of a deep error."""
    import struct
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise BackendError(f"{shard.name} is truncated (only {size} bytes)")
            header_len = struct.unpack("<Q", head)[0]
            if header_len > min(size - 8, 100 * 2**20):
                raise BackendError(f"{shard.name} is not a valid safetensors file (bad header length)")
            header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError):
        raise BackendError(f"{shard.name} is not a valid safetensors file (header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise BackendError(f"{shard.name} is truncated: {size} bytes on disk, "
                           f"{8 + header_len + end} expected")


def _weights_size(path: Path | None) -> int:
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
