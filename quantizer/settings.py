"""What a quantization job is asked to do, validated before any work starts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from quantizer.calibration import validate_counts
from quantizer.grid import GridSpec, validate_bits_group
from quantizer.gptq import GPTQOptions

METHODS = ("gptq", "rtn")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class QuantizeSettings:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp: float = 0.01
    mse: bool = False
    token_clip: float | None = None
    method: str = "gptq"
    calib: str = "generated"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    batch_size: int = 1

    def validate(self) -> "QuantizeSettings":
        """Raise ValueError with a sentence a user can act on."""
        validate_bits_group(self.bits, self.group_size)
        validate_counts(self.nsamples, self.seqlen)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not str(self.calib).strip():
            raise ValueError("pick a calibration source: generated, builtin, c4, wikitext2, ptb or a text file")
        self.gptq_options()  # damp, token_clip
        return self

    def grid(self) -> GridSpec:
        return GridSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, mse=self.mse)

    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(act_order=self.act_order, static_groups=self.static_groups,
                           damp_percent=float(self.damp), token_clip=self.token_clip)

    @property
    def checkpoint_format(self) -> str:
        return "gptq" if self.sym else "gptq_v2"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
