"""Which decoding path computes what a full forward computes: each cached decoding path of the gptq engine
is fed the same tokens (teacher forcing) and its logits are compared with one full-sequence forward.

    python -m bench.decode_paths [--layers 4] [--prompt 64] [--steps 24] [--device cuda]

Paths: HF attention over the static cache, eagerly and replayed from a CUDA graph; our decoding
attention kernel (decode_attention.py) replayed from a graph. A random fp16 LLaMA with 7B widths is
enough: a path that writes the cache at the wrong slot or masks the wrong positions shows up as a
large error, whatever the weights.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends import torch_generation  # noqa: E402
from backends.gptq.cuda_graph import GraphDecoder  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    small = device.type != "cuda"
    config = LlamaConfig(hidden_size=256 if small else 4096, intermediate_size=512 if small else 11008,
                         num_hidden_layers=args.layers, num_attention_heads=8 if small else 32,
                         num_key_value_heads=8 if small else 32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (args.prompt + args.steps,), generator=g).tolist()
    prompt, forced = tokens[: args.prompt], tokens[args.prompt:]
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([tokens], device=device), use_cache=False).logits[0].float()
    reference = full[args.prompt - 1: args.prompt - 1 + args.steps + 1]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {device}, {args.layers} layers, "
          f"prompt {args.prompt}, {args.steps} forced steps, static cache {args.max_len}", flush=True)

    def check(name, step):
        got = torch_generation.greedy_logits(step, prompt, args.steps, device, tokens=forced)
        err = (got - reference).norm(dim=-1) / reference.norm(dim=-1)
        top1 = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
        first_bad = next((i for i, e in enumerate(err.tolist()) if e > 1e-2), None)
        print(f"  {name:<40} rel err max {float(err.max()):.1e} (step 0: {float(err[0]):.1e}), top-1 {top1 * 100:.0f}%, "
              f"first step over 1e-2: {first_bad}", flush=True)

    check("HF dynamic cache (generate's path)", torch_generation._default_forward(model))
    check("HF attention, static cache, eager", GraphDecoder(model, device, args.max_len, use_graph=False).step)
    if device.type == "cuda":
        check("HF attention, static cache, CUDA graph", GraphDecoder(model, device, args.max_len).step)
        from backends.gptq.decode_attention import route_decode_attention
        routed = copy.deepcopy(model)
        route_decode_attention(routed)
        check("attention kernel, static cache, CUDA graph", GraphDecoder(routed, device, args.max_len).step)


if __name__ == "__main__":
    main()
