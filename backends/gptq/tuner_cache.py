"""The tuner's launch configs and their cache file (`~/.cache/gptq-webui/triton-tune-*.json`), shared
by every process on the machine: one JSON object of shape key -> config, merged under a lock on each
save, read leniently (a damaged entry costs a re-tune of that shape, never a failed load)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TUNER_VERSION = 15  # 2: cold weight copies; 3: more half2 GEMV tiles; 4: modes 5, 6; 5: stage_x; 6: mode 6 gone;
#                     7: half2 kernels without bounds masks on whole tiles and without a division per tile,
#                        the tensor-core kernel at 2 and 3 bits; 8: mode 7 (Gluon);
#                     9: mode 7 reads x and words straight into registers (other tiles and splits);
#                     10: mode 8 at 2-16 rows; 11: mode 9 (wgmma) at 2-16 rows, 2 bits, mode 8 at 3 bits;
#                     12: mode 8 tiles of two groups (4 bits, groups under 128 values);
#                     13: mode 8 requests x in its own iteration, and words two tiles ahead at 16 rows;
#                     14: words load evict-first (modes 3-5 and 8); 15: mode 8 form 3 under a register cap
#                     (3-bit layers in mode 8's fields order are keyed apart, "-f3": no re-tuning of the rest)


@dataclass(frozen=True)
class GemmConfig:
    """One launch of a layer's matmul: the path, the tile, split and warps, the kernel (mode) and its options."""
    path: str = "fused"        # "fused" | "dequant"
    block_m: int = 1
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2        # Triton's software-pipelining depth; mode 8: its pipeline form (gluon_gemv.PIPELINES)
    mode: int = 2              # 0 per word (3-D), 1 per row, 2 unrolled value slots, 3 prefetching GEMV (M=1),
    #                            4 half2 GEMV (M=1, fp16, 2/3/4-bit interleaved words),
    #                            5 half2 unpack + tensor cores (1 < M <= 64, fp16, 2/3/4-bit interleaved words)
    #                            7 the same in Gluon with hand-chosen operand layouts (1 < M <= 16, fp16,
    #                            4-bit interleaved words, whole tiles: gluon_mma.py)
    #                            8 weights as the tensor cores' A operand, unpacked without fix-ups (1 <= M <= 16,
    #                            fp16, 2/3/4/8-bit interleaved words, whole tiles: gluon_gemv.py)
    #                            9 mode 8 on Hopper's warpgroup MMA, x shared through shared memory (1 < M <= 16,
    #                            sm_90; gluon_wgmma.py)
    #                            (6, W^T x^T on the tensor cores, lost to 5 on an H100 and was removed)
    gather_x: bool = False     # act-order: permute the activations once (one gather) and run the perm-free
    #                            kernel, instead of each program loading x through perm (scattered reads)
    stage_x: bool = False      # act-order, mode 4: each program gathers its split's slice of x once into a
    #                            scratch row at its start (no extra launch, no per-tile gathers)
    max_registers: int = 0     # registers per thread the compiler may use (ptxas maxnreg; 0: its own choice).
    #                            ptxas schedules to the cap: fewer registers let more warps share an SM, more
    #                            let it issue loads earlier (the tuner offers caps for mode 8 only)

    def compile_options(self) -> dict:
        """Launch options beyond the warps and stages (Triton's `maxnreg` only where a cap is set)."""
        return {"maxnreg": self.max_registers} if self.max_registers else {}


def save_configs(cache_file: Path, configs: dict[str, GemmConfig]) -> None:
    """Write `configs` into the cache file, over what other processes sharing it (the web UI, a benchmark,
    a second model) saved meanwhile: their entries are kept, not overwritten. A read-only or full disk
    is ignored: the cache is an optimisation and must not break inference."""
    tmp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache_file.with_name(cache_file.name + ".lock")):
            merged = {**read_tuner_cache(cache_file), **configs}
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({k: asdict(v) for k, v in merged.items()}, f, indent=1)
            os.replace(tmp, cache_file)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(lock_file: Path):
    """Hold an exclusive lock on lock_file (POSIX `flock`; where there is none, no lock: a lost entry only
    costs a re-tune), so that two processes' read-merge-write of the cache do not interleave."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_tuner_cache(path: Path) -> dict[str, GemmConfig]:
    """The configs saved in a tuner cache file. An entry that does not read as a config (a hand-edited
    file, unknown or wrong-typed fields) is dropped alone, and an unreadable file reads as empty: the
    cache only saves tuning time, and a load must not fail on it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    kinds = {name: type(value) for name, value in asdict(GemmConfig()).items()}
    configs = {}
    for key, fields in raw.items():
        if (isinstance(fields, dict) and set(fields) <= set(kinds)
                and all(type(value) is kinds[name] for name, value in fields.items())):
            configs[key] = GemmConfig(**fields)
    return configs


def default_cache_file(device=None) -> Path | None:
    """~/.cache/gptq-webui/triton-tune-v<n>-<gpu>-<triton>.json, per GPU model and Triton version; n
    changes whenever the tuner's measurement changes, so configs chosen the old way are not reused."""
    if not torch.cuda.is_available():
        return None
    import triton
    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptq-webui"
    return base / f"triton-tune-v{TUNER_VERSION}-{name}-{triton.__version__}.json"
