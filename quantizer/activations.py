"""Calibration activations of one layer boundary: on the GPU when they fit, else in RAM, else in a
memory-mapped file in a temp folder (so a 7B model's activations never have to fit in RAM)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch

_NP = {torch.float32: np.float32, torch.float16: np.float16}


def choose_location(nbytes: int, device: torch.device, ram_fraction: float = 0.5) -> str:
    """`cuda` when two copies (inputs and outputs) fit in 60% of free GPU memory, else `cpu` when they
    fit in `ram_fraction` of available RAM, else `disk`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if 2 * nbytes < 0.6 * free:
            return "cuda"
    if 2 * nbytes < ram_fraction * psutil.virtual_memory().available:
        return "cpu"
    return "disk"


class ActivationStore:
    """`n` tensors of shape `shape`, one per calibration sample."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, location: str,
                 device: torch.device, spill_dir: Path | None = None):
        self.n, self.shape, self.dtype, self.location, self.device = n, tuple(shape), dtype, location, device
        self._dir = None
        if location == "disk":
            if dtype not in _NP:
                raise ValueError(f"cannot spill {dtype} activations to disk")
            self._dir = Path(tempfile.mkdtemp(prefix="gptq-act-", dir=spill_dir))
            self._data = np.lib.format.open_memmap(self._dir / "act.npy", mode="w+", dtype=_NP[dtype],
                                                   shape=(n, *self.shape))
        else:
            target = device if location == "cuda" else torch.device("cpu")
            self._data = torch.empty((n, *self.shape), dtype=dtype, device=target)

    @property
    def nbytes(self) -> int:
        return self.n * int(np.prod(self.shape)) * torch.tensor([], dtype=self.dtype).element_size()

    def get(self, i: int) -> torch.Tensor:
        """Sample i on the compute device."""
        if self.location == "disk":
            return torch.from_numpy(np.array(self._data[i])).to(self.device)
        return self._data[i].to(self.device, non_blocking=True)

    def set(self, i: int, value: torch.Tensor) -> None:
        if self.location == "disk":
            self._data[i] = value.detach().to("cpu").numpy()
        else:
            self._data[i].copy_(value.detach())

    def get_batch(self, idx) -> torch.Tensor:
        """Samples `idx` stacked into one [len(idx), *shape] tensor on the compute device."""
        return torch.stack([self.get(i) for i in idx])

    def set_batch(self, idx, values: torch.Tensor) -> None:
        for offset, i in enumerate(idx):
            self.set(i, values[offset])

    def close(self) -> None:
        self._data = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
