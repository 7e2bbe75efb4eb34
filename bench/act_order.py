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

Prompts (--prompts 16,64,512): each engine's prompt step at those lengths, eager as the backend runs it
(the wall time, best of 5) and its GPU kernel time (the sum of its kernels' durations under the
profiler: what act-order costs the GPU, without the host's launch gaps), with the gathering launches of
one prompt. Two more engines keep their prompts off the residual route (prompts as they ran before they
took it: the layers' own norms and adds, and an act-order prompt gathers q/k/v's and gate/up's input):
the checkpoint without act-order and the backend's act-order engine. Each prompt ratio is against the
engine without act-order whose prompts run the same way.

    python -m bench.act_order [--layers 32] [--new 128] [--prompts 16,64,512] [--out DIR] [--ckpt /tmp/ckpt-ao]
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
                          kernel_us, llama7b_config, load_gptq, profile_table)


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


def gathers_per_step(model, runtime, prompt, device, max_len) -> tuple[int, int]:
    """Kernel launches that gather their input (act-order perm in the kernel) in an eager prompt step
    and in the decoding step after it: (prompt, step)."""
    from backends.gptq.cuda_graph import GraphDecoder
    seen = []
    real = runtime.matmul
    runtime.matmul = lambda x2d, layer, bias=None: seen.append(layer.perm is not None) or real(x2d, layer, bias)
    try:
        decoder = GraphDecoder(model, device, max_len, use_graph=False)
        with torch.inference_mode():
            _, cache = decoder.step(torch.tensor([prompt], device=device), None)
            in_prompt = sum(seen)
            seen.clear()
            decoder.step(torch.tensor([[prompt[-1]]], device=device), cache)
    finally:
        del runtime.matmul
    return in_prompt, sum(seen)


def prompt_times(model, device, max_len: int, lengths, vocab: int) -> dict[int, tuple[float, float]]:
    """Per prompt length: (eager wall ms, best of 5, as GPTQBackend runs a prompt; GPU kernel ms of one
    prompt step, the sum of its kernels' durations under the profiler). The first step of each length
    is a warm-up (the tuner measures that row count's configs there)."""
    from torch.profiler import ProfilerActivity, profile
    from backends.gptq.cuda_graph import GraphDecoder
    decoder = GraphDecoder(model, device, max_len, use_graph=False)
    out = {}
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        with torch.inference_mode():
            decoder.step(ids, None)
            walls = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                decoder.step(ids, None)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t0)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decoder.step(ids, None)
                torch.cuda.synchronize()
        out[length] = (min(walls) * 1e3, sum(kernel_us(ev) for ev in prof.key_averages()) / 1e3)
    return out


def prompt_table(rows, lengths) -> list[str]:
    """The prompt steps' markdown table from rows (label, tok/s, (gathers per prompt, per step), {length:
    (wall ms, kernel ms)}, prompts on the residual route): each engine's ratio is against the engine
    without act-order ("no act-order...") whose prompts run the same way."""
    base = {routed: prompts for label, _, _, prompts, routed in rows if label.startswith("no act-order")}
    md = ["Prompt steps (eager wall ms, best of 5 / GPU kernel ms of one step; x: against no act-order at that "
          "length, prompts run the same way; gathering launches of one prompt step):", "",
          "| engine | gathers | " + " | ".join(f"{n} tokens: wall ms (x) | kernels ms (x)" for n in lengths) + " |",
          "| --- | --- | " + " | ".join("--- | ---" for _ in lengths) + " |"]
    for label, _, gathers, prompts, routed in rows:
        b = base[routed]
        md.append(f"| {label} | {gathers[0]} | " + " | ".join(
            f"{prompts[n][0]:.2f} ({prompts[n][0] / b[n][0]:.3f}) | {prompts[n][1]:.3f} ({prompts[n][1] / b[n][1]:.3f})"
            for n in lengths) + " |")
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed generations per engine (the best counts)")
    ap.add_argument("--ckpt", default="/tmp/gptq-webui-bench-ao")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--profile", action="store_true", help="also each engine's kernel table (bench.decode's)")
    ap.add_argument("--prompts", default="16,64,512",
                    help="prompt lengths to time each engine's prompt step at (empty: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.act_order needs a CUDA GPU")
    from backends.gptq.cuda_graph import GraphDecoder
    device = torch.device("cuda")
    config = llama7b_config(args.layers)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    lengths = [int(v) for v in args.prompts.split(",") if v.strip()]
    max_len = -(-(args.prompt + args.new + 1) // 256) * 256
    prompt_len = -(-(max(lengths, default=0) + 1) // 256) * 256  # the prompt steps' static cache
    rows, logits, profiles, tokens = [], {}, [], None
    for label, act, rewrites, attention_order, prompt_route in (
            ("no act-order", False, True, True, True),
            ("act-order, gathers in the kernels", True, False, True, True),
            ("act-order, rewritten, o_proj gathering", True, True, False, True),
            ("act-order, rewritten (the backend)", True, True, True, True),
            ("no act-order, prompts off the residual route", False, True, True, False),
            ("the backend, prompts off the residual route", True, True, True, False)):
        if not prompt_route and not lengths:
            continue
        folder = Path(args.ckpt) / ("ao" if act else "plain")
        if not folder.exists():
            t = time.time()
            build_checkpoint(config, folder, 4, 128, act_order=act)
            torch.cuda.empty_cache()
            print(f"{folder.name}: built in {time.time() - t:.0f} s", flush=True)
        model, runtime = engine(folder, device, rewrites, Path(args.ckpt) / "tuner.json", attention_order)
        if not prompt_route:
            from backends.gptq.cuda_graph import residual_route
            residual_route(model).prompts = False
        gathers = gathers_per_step(model, runtime, prompt, device, max_len)
        best, decoder = float("nan"), None
        if prompt_route:  # an engine with prompts off the route decodes as its twin on it: only its prompts are timed
            best = 0.0
            for _ in range(args.repeats):
                decoder, row = graph_decoding(model, prompt, args.new, device, max_len)
                best = max(best, row["tok_s"])
            if args.profile:
                profiles.append(f"{label}:\n\n" + profile_table(decoder, prompt, device, best))
                print(profiles[-1], flush=True)
        if act and prompt_route:
            out = torch_generation.greedy_logits(GraphDecoder(model, device, max_len).step, prompt, 23, device,
                                                 tokens=tokens)
            tokens = tokens or out.argmax(-1).tolist()  # the first act-order engine's tokens feed the others
            logits[label] = out
        prompts = prompt_times(model, device, prompt_len, lengths, config.vocab_size) if lengths else {}
        rows.append((label, best, gathers, prompts, prompt_route))
        print(f"{label}: {best:.1f} tok/s, gathering launches {gathers[0]} per prompt, {gathers[1]} per step; "
              + ", ".join(f"prompt {n}: {w:.2f} ms eager, {k:.3f} ms of kernels" for n, (w, k) in prompts.items()),
              flush=True)
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
    md += [f"| {label} | {tps:.1f} | {tps / base:.3f} | {g[1]} |" for label, tps, g, _, _ in rows if tps == tps]
    if lengths:
        md += [""] + prompt_table(rows, lengths)
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
