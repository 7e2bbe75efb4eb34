"""bitsandbytes engine: a Hugging Face model quantized on load (nf4 / fp4 / int8) through
transformers' `BitsAndBytesConfig`. Everything but building the model (tokenizer, chat template,
streamed generation, log-probs) is inherited from the transformers backend, so the comparison
measures the quantization and not a different generation loop."""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import torch

from backends.base import BackendError, Capabilities, OptionSpec
from backends.transformers_backend import TransformersBackend

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Messages of bitsandbytes that tell a user of this backend nothing they can act on, by logger:
# - once per int8 matmul whenever activations are not fp16 (always on CPU with a float32/bfloat16
#   model): hundreds of identical lines per generated token;
# - once at import on CPUs with AVX512-BF16, where bitsandbytes looks for a Hub kernel (which
#   import_bitsandbytes turns down) and falls back to its own CPU kernel; the message advises
#   trust_remote_code=True, the opposite of this workbench's default.
_NOTICES = {
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropNotice(logging.Filter):
    """Drops one message of one logger; every other bitsandbytes message still shows."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_bitsandbytes_notices() -> None:
    """Install the filters on bitsandbytes' loggers once (idempotent); before its first import."""
    for name, prefix in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


_IMPORT_LOCK = threading.Lock()


def import_bitsandbytes():
    """bitsandbytes, imported without Hub kernels. On CPUs with AVX512-BF16 its import asks the `kernels`
    package to download a compiled kernel from the Hugging Face Hub and load it into this process:
    native code from the network, at import, unasked (transformers itself leaves Hub kernels off unless
    `use_kernels=True`). With `kernels` unimportable for that one import, bitsandbytes runs its own CPU
    kernel, as on every other CPU."""
    silence_bitsandbytes_notices()
    with _IMPORT_LOCK:
        if "bitsandbytes" in sys.modules:
            return sys.modules["bitsandbytes"]
        saved = sys.modules.get("kernels")
        sys.modules["kernels"] = None                      # `from kernels import ...` raises ImportError
        try:
            import bitsandbytes
        finally:
            if saved is None:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = saved
        return bitsandbytes


class BitsAndBytesBackend(TransformersBackend):
    name = "bitsandbytes"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        dtypes=("float32", "float16", "bfloat16"),
        bits=(4, 8),
        formats=("hf",),
        options=(
            OptionSpec("quant", "choice", "nf4", ("nf4", "fp4", "int8"),
                       "nf4/fp4: 4-bit blocks of 64 weights with one absmax each; int8: LLM.int8() rows"),
            OptionSpec("double_quant", "bool", False,
                       help="4-bit only: quantize the absmax scales too (about 0.37 fewer bits per weight)"),
            OptionSpec("compute_dtype", "choice", "auto", ("auto", "float32", "float16", "bfloat16"),
                       "dtype of the matmuls and of the layers left unquantized (embeddings, norms, "
                       "lm_head); auto: float16 on CUDA, float32 on CPU"),
            OptionSpec("int8_threshold", "float", 6.0,
                       help="int8 only: activations above this stay in 16-bit (LLM.int8() outliers)",
                       minimum=0.0),
            OptionSpec("device", "choice", "auto", ("auto", "cpu", "cuda"), "auto: CUDA when present"),
            OptionSpec("threads", "int", 0, help="CPU threads for torch (0 = torch's default)", minimum=0),
        ),
    )

    def _resolve_dtype(self, options: dict) -> torch.dtype:
        name = options.get("compute_dtype", "auto")
        if name == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return _DTYPES[name]

    def quantization_config(self, options: dict):
        """The BitsAndBytesConfig for validated options; refuses combinations bitsandbytes would
        silently ignore."""
        from transformers import BitsAndBytesConfig
        quant = options.get("quant", "nf4")
        if quant == "int8":
            if options.get("double_quant"):
                raise BackendError("bitsandbytes: double_quant applies to nf4/fp4 only, not int8")
            return BitsAndBytesConfig(load_in_8bit=True,
                                      llm_int8_threshold=float(options.get("int8_threshold", 6.0)))
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                  bnb_4bit_use_double_quant=bool(options.get("double_quant")),
                                  bnb_4bit_compute_dtype=self._resolve_dtype(options))

    def _build_model(self, path: Path, options: dict):
        try:
            import_bitsandbytes()                              # fails early with a clear message
        except ImportError as exc:
            raise BackendError(f"bitsandbytes is not installed or cannot load: {exc}") from None
        from transformers import AutoModelForCausalLM
        config = self.quantization_config(options)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=config, dtype=self._resolve_dtype(options),
            device_map={"": str(self.device)}, use_safetensors=True, trust_remote_code=False)
        if not any(_is_bnb_linear(m) for m in model.modules()):
            raise BackendError(f"{path.name}: bitsandbytes quantized no layer (unsupported architecture?)")
        return model

    # -- reports ---------------------------------------------------------------------------
    def _tensors(self):
        """Every tensor the model holds, including bitsandbytes' quantization state (absmax,
        nested absmax, code book, int8 row scales), which are not parameters or buffers."""
        yield from super()._tensors()
        for module in self.model.modules():
            if _is_bnb_linear(module):
                yield from _quant_state_tensors(module)

    def bits_per_weight(self) -> float:
        """Stored bits (packed weights + their scales) per weight over the quantized linears."""
        self._require()
        bits = weights = 0
        for module in self.model.modules():
            if not _is_bnb_linear(module):
                continue
            weights += module.in_features * module.out_features
            seen = set()
            for tensor in [module.weight, *_quant_state_tensors(module)]:
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    bits += tensor.numel() * tensor.element_size() * 8
        if not weights:
            raise BackendError("bitsandbytes: the model holds no quantized layer")
        return bits / weights


def _is_bnb_linear(module) -> bool:
    import bitsandbytes as bnb
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _quant_state_tensors(module) -> list[torch.Tensor]:
    """The quantization state of one bitsandbytes linear (not parameters, so not counted by torch)."""
    out = []
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    while state is not None:  # 4-bit: absmax and code, then the nested state with double quant
        out += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                            getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    # int8: one float32 scale per output row; it moves from the weight to the module's state
    # on the first forward pass
    for scb in (getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)):
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out
