"""Act-order against no act-order, end to end: a LLaMA-7B-shaped model decoding at batch 1 through the
gptq backend's engine (static cache, CUDA graph, attention kernel, adds in the norms), four ways in
one run, each ratio against the first:

- the checkpoint without act-order;
- the same weights' act-order checkpoint (random perms, shared by q/k/v and by gate/up, as GPTQ's
  are) with every gather inside the kernels;
- that checkpoint with act_order.py's rewrites but o_proj still gathering (the backend before 3428a9b):
  down_proj's perm folded into gate/up, the norms writing q/k/v's and gate/up's order;
- that checkpoint as the backend runs it: the attention kernel also writes o_proj's order, so no
  layer gathers when decoding.

Each rewritten engine's logits are compared with the gathering one's on the same tokens (24 graph
steps): the rewrites are exact up to fp32 summation order.

    python -m bench.act_order [--layers 32] [--new 128] [--out DIR] [--ckpt /tmp/ckpt-ao]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends import torch_generation  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402
from bench.decode import (build_checkpoint, fuse_for_decoding, graph_decoding,  # noqa: E402
                          llama7b_config, load_gptq, profile_table)


def engine(folder: Path, device, rewrites: bool, tuner_cache: Path, attention_order: bool = True):
    """The checkpoint loaded and fused as GPTQBackend does on CUDA: (model, runtime). The engines share
    one tuner cache: the same shape gets the same kernel config in each. attention_order=False: the
    attention kernel writes its natural order and o_proj gathers (the A/B of that one rewrite)."""
    from backends.gptq.decode_attention import decode_route
    _, model, runtime = load_gptq(folder, device, tuner_cache)
    flags = SimpleNamespace(no_fuse_norms=False, no_fuse_siblings=False, attention_kernel=True,
                            no_act_order_rewrites=not rewrites)
    fuse_for_decoding(model, runtime, flags)
    if not attention_order:
        decode_route(model).orders.clear()
    return model, runtime


def gathers_per_step(model, runtime, prompt, device, max_len) -> int:
    """Kernel launches per eager decoding step that gather their input (act-order perm in the kernel)."""
    from backends.gptq.cuda_graph import GraphDecoder
    seen = []
    real = runtime.matmul
    runtime.matmul = lambda x2d, layer, bias=None: seen.append(layer.perm is not None) or real(x2d, layer, bias)
    try:
        decoder = GraphDecoder(model, device, max_len, use_graph=False)
        with torch.inference_mode():
            _, cache = decoder.step(torch.tensor([prompt], device=device), None)
            seen.clear()
            decoder.step(torch.tensor([[prompt[-1]]], device=device), cache)
    finally:
        del runtime.matmul
    return sum(seen)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed generations per engine (the best counts)")
    ap.add_argument("--ckpt", default="/tmp/gptq-webui-bench-ao")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--profile", action="store_true", help="also each engine's kernel table (bench.decode's)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.act_order needs a CUDA GPU")
    from backends.gptq.cuda_graph import GraphDecoder
    device = torch.device("cuda")
    config = llama7b_config(args.layers)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    max_len = -(-(args.prompt + args.new + 1) // 256) * 256
    rows, logits, profiles, tokens = [], {}, [], None
    for label, act, rewrites, attention_order in (
            ("no act-order", False, True, True), ("act-order, gathers in the kernels", True, False, True),
            ("act-order, rewritten, o_proj gathering", True, True, False),
            ("act-order, rewritten (the backend)", True, True, True)):
        folder = Path(args.ckpt) / ("ao" if act else "plain")
        if not folder.exists():
            t = time.time()
            build_checkpoint(config, folder, 4, 128, act_order=act)
            torch.cuda.empty_cache()
            print(f"{folder.name}: built in {time.time() - t:.0f} s", flush=True)
        model, runtime = engine(folder, device, rewrites, Path(args.ckpt) / "tuner.json", attention_order)
        gathers = gathers_per_step(model, runtime, prompt, device, max_len)
        best = 0.0
        for _ in range(args.repeats):
            decoder, row = graph_decoding(model, prompt, args.new, device, max_len)
            best = max(best, row["tok_s"])
        if args.profile:
            profiles.append(f"{label}:\n\n" + profile_table(decoder, prompt, device, best))
            print(profiles[-1], flush=True)
        if act:
            out = torch_generation.greedy_logits(GraphDecoder(model, device, max_len).step, prompt, 23, device,
                                                 tokens=tokens)
            tokens = tokens or out.argmax(-1).tolist()  # the first act-order engine's tokens feed the others
            logits[label] = out
        rows.append((label, best, gathers))
        print(f"{label}: {best:.1f} tok/s, {gathers} gathering launches per step", flush=True)
        del model, runtime, decoder
        torch.cuda.empty_cache()
    gathering = logits.pop("act-order, gathers in the kernels")
    agreement = {label: (float((out - gathering).norm() / gathering.norm()),
                         float((out.argmax(-1) == gathering.argmax(-1)).float().mean()))
                 for label, out in logits.items()}  # each rewritten engine's
    base = rows[0][1]
    md = [f"### Act-order end to end - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - "
          f"{torch.cuda.get_device_name()} - commit {tree_commit()}", "",
          f"Command: `python -m bench.act_order {' '.join(sys.argv[1:])}`. LLaMA-7B shape ({args.layers} layers), "
          f"random weights, RTN 4-bit g128 sym, the same weights with and without act-order; prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, batch 1, best of {args.repeats}; torch {torch.__version__}. Rewritten "
          "engines against the gathering one over 24 graph steps on the same tokens: "
          + "; ".join(f"{label}: logits rel err {err:.1e}, top-1 {top1 * 100:.0f}%"
                      for label, (err, top1) in agreement.items()) + ".", "",
          "| engine | decode tok/s | x no act-order | gathering launches per step |", "| --- | --- | --- | --- |"]
    md += [f"| {label} | {tps:.1f} | {tps / base:.3f} | {g} |" for label, tps, g in rows]
    text = "\n".join(md) + "\n" + "".join("\n" + p for p in profiles)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "act_order.md").write_text(text)
    print(text, flush=True)
    shutil.rmtree(args.ckpt, ignore_errors=True)
    wrong = [label for label, (err, top1) in agreement.items() if err > 2e-2 or top1 < 0.9]
    if wrong:
        sys.exit(f"{', '.join(wrong)}: does not compute what the gathering engine does")


if __name__ == "__main__":
    main()
