"""GraphDecoder's capture-and-replay protocol on CPU: a stand-in for the CUDA graph runs the warm-up, captures
nothing and re-runs the step at each replay, as a graph re-runs its kernels on the same tensors. Why: the
warm-up step before a capture advances the static cache's own position counter (transformers 5.x writes
at cumulative_length); left advanced, every replay wrote its key and value one slot after the position
its mask and rotary use (7B on an H200: logits 43% off a full forward after two graph steps)."""
from __future__ import annotations

import pytest
import torch

from backends import torch_generation
from backends.gptq.cuda_graph import GraphDecoder
from tests.backends.gptq.support import CaptureLog, ReplayByRerun


def test_replayed_steps_match_a_full_forward(tiny_llama):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 320, (20,), generator=g).tolist()
    prompt, forced = tokens[:12], tokens[12:]
    with torch.inference_mode():
        full = tiny_llama(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
    reference = full[len(prompt) - 1:]
    graphs = CaptureLog()
    decoder = GraphDecoder(tiny_llama, torch.device("cpu"), max_len=64, step_capture=graphs)
    for _ in range(2):  # a second conversation reuses the cache and the captured step
        got = torch_generation.greedy_logits(decoder.step, prompt, len(forced), tokens=forced)
        err = (got - reference).norm(dim=-1) / reference.norm(dim=-1)
        assert float(err.max()) < 1e-4, err.tolist()
    # one capture; the first conversation's first step runs eagerly, every later step replays
    assert len(graphs) == 1 and graphs[0].replays == (len(forced) - 1) + len(forced)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (real graph capture)"))])
def test_rows_side_by_side_replay_each_rows_own_forward(tiny_llama, device):
    """Several sequences decoded at once (the generated calibration source samples 64 rows a step): every
    row's replayed logits are that row's full forward; a prompt of another batch gets a new cache and capture.
    On CPU a stand-in re-runs the captured step; on a GPU real CUDA graphs in fp16."""
    g = torch.Generator().manual_seed(5)
    model = tiny_llama.to(device, torch.float16 if device == "cuda" else torch.float32)
    graphs = CaptureLog() if device == "cpu" else None
    decoder = GraphDecoder(model, torch.device(device), max_len=32, step_capture=graphs)
    for rows in (3, 3, 2):
        tokens = torch.randint(0, 320, (rows, 10), generator=g).to(device)
        with torch.inference_mode():
            full = model(input_ids=tokens, use_cache=False).logits.float()
            logits, cache = decoder.step(tokens[:, :4], None)
            got = [logits[:, -1].float()]
            for i in range(4, 9):
                logits, cache = decoder.step(tokens[:, i:i + 1], cache)
                got.append(logits[:, -1].float())
        got = torch.stack(got, dim=1)                                        # [rows, 6, vocab]
        reference = full[:, 3:9]
        err = (got - reference).norm(dim=-1) / reference.norm(dim=-1)
        assert got.shape == reference.shape and float(err.max()) < (1e-4 if device == "cpu" else 1e-2), err.tolist()
        assert decoder.graph is not None
    if graphs is not None:  # one capture for the batches of 3 (the second replays all 5 steps), one for the 2
        assert len(graphs) == 2 and graphs[0].replays == 4 + 5 and graphs[1].replays == 4


def test_pipelined_generation_through_replays(tiny_llama):
    """stream_generate's pipelined greedy loop (the token fed to the next replay straight from the
    device) gives the reply of the step-by-step loop through the same captured step."""
    from backends.base import SamplingParams
    replies = []
    for pipeline in (False, True):
        decoder = GraphDecoder(tiny_llama, torch.device("cpu"), max_len=64, step_capture=ReplayByRerun)
        chunks = torch_generation.stream_generate(
            tiny_llama, [5, 17, 42, 7, 99], SamplingParams(temperature=0.0, max_new_tokens=10), eos_ids=set(),
            decode=lambda ids: ",".join(map(str, ids)), device=torch.device("cpu"), context_length=64,
            forward=decoder.step, pipeline=pipeline)
        replies.append("".join(c.text for c in chunks))
        assert decoder.graph is not None and decoder.graph.replays == 8  # 10 tokens: prompt, eager step, 8 replays
    assert replies[0] == replies[1] and replies[0].count(",") == 9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture, cuBLAS workspaces)")
def test_repeated_captures_keep_no_memory():
    """Each load, and each growth of the static cache, captures a new decoding graph. torch keeps a cuBLAS
    workspace (32 MiB on Hopper) per stream cuBLAS ran on; warming up on a fresh stream per capture kept
    one more per capture. On the GPU's one capture stream, memory after a released capture is flat."""
    from backends.gptq.cuda_graph import CudaGraphStep, capture_stream
    device = torch.device("cuda")
    a = torch.randn(64, 256, device=device, dtype=torch.float16)
    b = torch.randn(256, 512, device=device, dtype=torch.float16)
    left = []
    for _ in range(4):
        step = CudaGraphStep(lambda: a @ b, lambda: a @ b, device)
        a.add_(1.0 / 64)
        assert torch.allclose(step.replay(), a @ b, rtol=1e-2, atol=1e-2)  # the replay reads the new a
        del step
        torch.cuda.synchronize()
        left.append(torch.cuda.memory_allocated(device))
    assert capture_stream(device) is capture_stream(torch.device("cuda", torch.cuda.current_device()))
    assert left[1] == left[2] == left[3], left  # nothing more kept per capture after the first
