"""The tuner cache (`~/.cache/gptq-webui/triton-tune-*.json`) is shared by every process on the machine:
the web UI, a benchmark, a second model. Each must keep what the others saved, and a damaged file must
cost tuning time only, never a load."""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from backends.gptq.kernel_runtime import GemmConfig, KernelRuntime
from backends.gptq.tuner_cache import read_tuner_cache
from backends.gptq.quant_linear import make_kernel_layer
from tests.backends.gptq.support import random_packed_layer


def _layer(K: int, N: int, bits: int = 4, group_size: int = 128, device: str = "cpu"):
    packed, _ = random_packed_layer(bits, group_size, K, N, seed=K + N)
    return make_kernel_layer(*packed, bits, group_size, "gptq_v2", device)


def _pick(cache: Path, K: int, N: int, rows: int) -> str:
    """One runtime choosing (and saving) a config for one shape, as a backend does on its first call."""
    runtime = KernelRuntime(cache_file=cache)
    layer = _layer(K, N)
    x = torch.zeros(rows, K, dtype=torch.float16)
    runtime.config_for(x, layer)
    return runtime.key(x, layer)


def test_processes_sharing_the_cache_keep_each_others_configs(tmp_path):
    cache = tmp_path / "tune.json"
    first = KernelRuntime(cache_file=cache)  # loaded before the others save: an older view of the file
    key_a = _pick(cache, 256, 128, 1)
    key_b = _pick(cache, 512, 256, 16)
    layer = _layer(256, 256)
    x = torch.zeros(1, 256, dtype=torch.float16)
    first.config_for(x, layer)  # its save must not drop a and b, which it never saw
    saved = read_tuner_cache(cache)
    assert {key_a, key_b, first.key(x, layer)} <= set(saved)
    assert set(KernelRuntime(cache_file=cache).configs) == set(saved)
    assert not [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temporary file left


def _pick_in_process(args):
    cache, K, N = args
    return _pick(Path(cache), K, N, 1)


def test_concurrent_saves_leave_a_readable_file(tmp_path):
    cache = tmp_path / "tune.json"
    shapes = [(256, 64 * (i + 1)) for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        keys = pool.map(_pick_in_process, [(str(cache), K, N) for K, N in shapes])
    saved = json.loads(cache.read_text(encoding="utf-8"))
    assert set(saved) == set(keys) and len(keys) == 8  # every process's config, whatever the interleaving
    assert not [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_a_damaged_cache_drops_only_its_bad_entries(tmp_path):
    cache = tmp_path / "tune.json"
    good = GemmConfig(block_n=256, split_k=4, mode=4)
    cache.write_text(json.dumps({
        "good": {"path": "fused", "block_n": 256, "split_k": 4, "mode": 4},
        "unknown-field": {"path": "fused", "tile": 3},
        "wrong-type": {"path": "fused", "block_n": "256"},
        "bool-for-int": {"path": "fused", "split_k": True},
        "not-a-dict": [1, 2],
    }), encoding="utf-8")
    assert KernelRuntime(cache_file=cache).configs == {"good": good}
    for damaged in ("{\"truncated\": {\"path\"", "[1, 2, 3]", "\x00\xff"):
        cache.write_text(damaged, encoding="utf-8")
        runtime = KernelRuntime(cache_file=cache)
        assert runtime.configs == {}
        layer, x = _layer(256, 128), torch.zeros(1, 256, dtype=torch.float16)
        runtime.config_for(x, layer)  # and the next save replaces the damaged file with a good one
        assert set(read_tuner_cache(cache)) == {runtime.key(x, layer)}


def test_an_unwritable_cache_does_not_break_a_call(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        runtime = KernelRuntime(cache_file=folder / "tune.json")
        layer, x = _layer(256, 128), torch.zeros(1, 256, dtype=torch.float16)
        cfg = runtime.config_for(x, layer)
        assert runtime.configs[runtime.key(x, layer)] == cfg
        if os.geteuid() != 0:  # root writes anyway
            assert list(folder.iterdir()) == []
    finally:
        os.chmod(folder, 0o700)


def test_a_cached_config_this_code_no_longer_offers_is_picked_again(tmp_path):
    """A file from an older version may hold a config since withdrawn: mode 5 on tiles of two 2-bit words,
    the untuned default for 2-bit g32 layers at 2-16 rows until it gave wrong sums compiled (2026-12-05).
    It is dropped and the shape picked again; a config still offered is used as saved."""
    cache = tmp_path / "tune.json"
    two_bit = _layer(256, 128, bits=2, group_size=32)
    rows16 = torch.zeros(16, 256, dtype=torch.float16)
    runtime = KernelRuntime(cache_file=cache)
    stale = GemmConfig("fused", 16, 64, 32, 2, 4, num_stages=3, mode=5)
    offered = runtime.candidates(16, two_bit)
    assert stale not in offered
    kept_layer, one_row = _layer(256, 128), torch.zeros(1, 256, dtype=torch.float16)
    not_default = runtime.candidates(1, kept_layer)[3]
    cache.write_text(json.dumps({runtime.key(rows16, two_bit): asdict(stale),
                                 runtime.key(one_row, kept_layer): asdict(not_default)}), encoding="utf-8")
    fresh = KernelRuntime(cache_file=cache)
    assert fresh.config_for(rows16, two_bit) == offered[0]
    assert fresh.config_for(one_row, kept_layer) == not_default
    assert read_tuner_cache(cache)[fresh.key(rows16, two_bit)] == offered[0]  # the file is mended too


def test_untuned_picks_are_not_saved(tmp_path):
    """autotune off picks each shape's default without measuring: saving it would stop every later run
    (autotune on) from measuring that shape."""
    cache = tmp_path / "tune.json"
    runtime = KernelRuntime(tune=False, cache_file=cache)
    layer, x = _layer(256, 128), torch.zeros(1, 256, dtype=torch.float16)
    assert runtime.config_for(x, layer) == runtime.candidates(1, layer)[0]
    assert not cache.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
def test_picks_made_during_cuda_graph_capture_are_not_saved(tmp_path):
    """Nothing can be timed inside a CUDA graph capture, so a shape first met there runs its default.
    Saving that pick, then or with a later shape's save, would stop every later process from measuring the
    shape; the captured graph must still compute the right product."""
    cache = tmp_path / "tune.json"
    runtime = KernelRuntime(cache_file=cache)
    K, N = 512, 384
    packed, weight = random_packed_layer(4, 128, K, N, seed=K + N)
    layer = make_kernel_layer(*packed, 4, 128, "gptq_v2", "cuda")
    x = torch.randn(1, K, dtype=torch.float16, device="cuda")
    default = runtime.candidates(1, layer, x.device, x.dtype)[0]
    runtime.run(x, layer, default)  # compiled and its scratch sized outside the capture, as the decoder's eager steps do
    torch.cuda.synchronize()
    assert not cache.exists()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = runtime.matmul(x, layer)
    x.copy_(torch.randn(1, K, dtype=torch.float16, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert runtime.key(x, layer) not in runtime.configs
    other, x_other = _layer(256, 128, device="cuda"), torch.randn(1, 256, dtype=torch.float16, device="cuda")
    runtime.matmul(x_other, other)  # outside a capture the same runtime measures and saves
    saved = read_tuner_cache(cache)
    assert runtime.key(x_other, other) in saved and runtime.key(x, layer) not in saved
    runtime.matmul(x, layer)  # the captured shape's first call outside a capture measures it
    assert runtime.key(x, layer) in read_tuner_cache(cache)
    reference = x.double().cpu() @ weight
    assert (y.double().cpu() - reference).norm() / reference.norm() < 1e-2
