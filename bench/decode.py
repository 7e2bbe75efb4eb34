"""BENCH.md section 2: end-to-end decoding of a LLaMA-7B-shaped model with random weights, 4-bit g128
RTN in our GPTQ format, through the gptq backend's loader and decoding step, against transformers fp16
with the same (dequantized) weights, and the bandwidth limit, all in the same run.

    python -m bench.decode [--layers 32] [--prompt 64] [--new 256] [--out DIR] [--ckpt /tmp/ckpt] [--profile]
    python -m bench.decode --profile-only      # gptq alone: where a decoding step's GPU time goes

Both engines run the shared sampling loop (backends/torch_generation.stream_generate, greedy) exactly as
the backends do; transformers uses its default eager step with a dynamic cache, gptq its static cache +
CUDA graph step. Decode tokens/s excludes prefill; time-to-first-token is reported separately.
Needs CUDA; imports no UI or other engine packages.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends import torch_generation  # noqa: E402
from backends.base import SamplingParams  # noqa: E402
from backends.gptq import format as fmt  # noqa: E402
from backends.gptq.rtn import LINEAR_RE, rtn_quantize  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402


def llama7b_config(layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def act_order_seed(name: str) -> int:
    """The act-order perm seed of a projection: siblings that read one input (q/k/v, gate/up) share it,
    as a GPTQ checkpoint's do (they are quantized against one Hessian)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    for proj, shared in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        base = base.replace(proj, shared)
    return zlib.crc32(base.encode())


def build_checkpoint(config, folder: Path, bits: int, group: int, seed: int = 0, act_order: bool = False):
    """Random fp16 model on the GPU, RTN-quantized layer by layer into a GPTQ checkpoint at `folder`
    (act_order: rows grouped in a random order per layer, shared by siblings, desc_act set); returns
    the fp16 model with its linears replaced by the dequantized weights (the baseline)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if LINEAR_RE.match(name):
                base = name[: -len(".weight")]
                codes, zeros, scales, g_idx = rtn_quantize(p.data, bits, group, sym=True,
                                                           act_order_seed=act_order_seed(name) if act_order else None)
                tensors[base + ".qweight"] = fmt.pack_qweight(codes, bits).cpu()
                tensors[base + ".qzeros"] = fmt.pack_qzeros(zeros, bits, "gptq").cpu()
                tensors[base + ".scales"] = scales.cpu()
                tensors[base + ".g_idx"] = g_idx.to(torch.int32).cpu()
                gl = g_idx.long()
                p.data.copy_((scales.float()[gl] * (codes.float() - zeros.float()[gl])).t().half())
                del codes
            else:
                tensors[name] = p.data.cpu()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    base = config.to_dict()
    fmt.write_quantize_config(folder, fmt.QuantizeConfig(bits=bits, group_size=group, sym=True, desc_act=act_order,
                                                         meta={"quantizer": ["gptq-webui-rtn"]}), base)
    return model


def warm_then_time(model, prompt_ids, new_tokens, forward, device, logprobs: int | None = None) -> dict:
    """BENCH.md section 2's "after one warm-up generation": a whole warm-up generation of the same length (which
    also tunes the kernels and captures a graph engine's graph), then the timed one. Why whole: eager transformers
    fp16 ran its first 256-token generation about 7x slower than the next ones on an H100 (2026-12-06, whatever
    the KV cache), so a 16-token warm-up left that baseline too slow and every "x fp16" ratio too high. The
    warm-up's speed and wall time are kept in the row (warmup_tok_s, warmup_s)."""
    started = time.perf_counter()
    _, warm_tps, _ = run_generation(model, prompt_ids, new_tokens, forward, device, logprobs)
    warm_s = time.perf_counter() - started
    ttft, tps, n = run_generation(model, prompt_ids, new_tokens, forward, device, logprobs)
    return dict(ttft_ms=ttft * 1e3, tok_s=tps, tokens=n, warmup_tok_s=warm_tps, warmup_s=warm_s)


def run_generation(model, prompt_ids, new_tokens, forward, device, logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, logprobs=logprobs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stamps = []
    for chunk in torch_generation.stream_generate(model, prompt_ids, params, eos_ids=set(), decode=lambda ids: "",
                                                  device=device, context_length=2048, forward=forward):
        if not chunk.finished:
            stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return ttft, tps, len(stamps)


def cpu_main(args) -> None:
    """CPU: the gptq backend (torch path) against the transformers backend on the default model's fp
    weights, same machine, same run, alternating, median of repeats."""
    import statistics
    import tempfile
    from backends.gptq import rtn
    from backends.registry import create_backend
    src = REPO / "models" / "SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(prefix="gptq-cpu-bench-"))
    ckpt = rtn.quantize_folder(src, tmp / "smol-4bit", bits=args.bits, group_size=args.group)
    engines = {}
    for name, path, extra in (("transformers fp32", src, {}),
                              (f"gptq {args.bits}-bit (fp32 copy, cpu_int4=off)", ckpt, {"cpu_int4": "off"}),
                              (f"gptq {args.bits}-bit (int4 kernel, HF forward: cpu_decoder=false)", ckpt,
                               {"cpu_decoder": False}),
                              (f"gptq {args.bits}-bit (int4 kernel + CPU decoder, the default)", ckpt, {})):
        b = create_backend("transformers" if name.startswith("transformers") else "gptq")
        b.load(path, b.validate_options({"device": "cpu", "dtype": "float32", **extra}))
        engines[name] = b
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new)
    rates = {k: [] for k in engines}
    for _ in range(args.repeats):
        for name, b in engines.items():
            stamps = [time.perf_counter() for c in b.chat(messages, params) if not c.finished]
            rates[name].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["transformers fp32"]
    lines = [f"### Decode on CPU - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - "
             f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, torch's CPU kernels "
             f"{torch.backends.cpu.get_cpu_capability()} - commit {tree_commit()}", "",
             f"Command: `python -m bench.decode --cpu {' '.join(a for a in sys.argv[1:] if a != '--cpu')}`. "
             f"SmolLM2-135M-Instruct, RTN {args.bits}-bit g{args.group}; greedy, {args.new} new tokens, chat prompt; "
             f"median of {args.repeats} alternating runs (shared machine).", "",
             "| engine | decode tok/s | x transformers | RAM MB (memory report) |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v:.1f} | {v / base:.2f} | {engines[k].memory_report().ram_mb:.0f} |" for k, v in med.items()]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_cpu.md").write_text(text)
    print(text)
    for b in engines.values():
        b.unload()
    shutil.rmtree(tmp, ignore_errors=True)


def smoke_main(args) -> None:
    """GPU check of the GPTQBackend class itself (registry, tokenizer, options, generate through the
    static cache + CUDA graph, fused norms and siblings, memory report) on a small random LLaMA with the
    tokenizer files found in --tokenizer: the logits of every graph-replayed decoding step must match a
    plain full-sequence forward at the same positions."""
    from backends.base import SamplingParams as SP
    from backends.registry import create_backend
    kernel_err = attention_kernel_errors()
    print(f"decode attention kernel vs float64 (positions x splits): worst rel err {max(kernel_err.values()):.1e}",
          flush=True)
    tok = Path(args.tokenizer)
    config = llama7b_config(args.layers)
    config.vocab_size = 49152  # the tokenizer's
    folder = Path(args.ckpt)
    shutil.rmtree(folder, ignore_errors=True)
    fp16 = build_checkpoint(config, folder, args.bits, args.group, act_order=args.act_order)
    del fp16
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok / name).exists():
            shutil.copy2(tok / name, folder / name)
    print(f"checkpoint built ({'act-order' if args.act_order else 'no act-order'})", flush=True)
    backend = create_backend("gptq")
    backend.load(folder, backend.validate_options({"device": "cuda", "attention_kernel": args.attention_kernel}))
    paths = sorted({layer.path for layer in backend.quant_layers.values()})
    print(f"loaded: {paths}", flush=True)
    chunks = list(backend.chat([{"role": "user", "content": "Hello there"}], SP(max_new_tokens=24)))
    report = backend.memory_report()
    # the API's log-probs: score_tokens on the chat's prompt + reply, against the perplexity path
    reply = [t for c in chunks for t in c.token_ids]
    scored_ids = backend.tokenize(backend.render_chat([{"role": "user", "content": "Hello there"}])) + reply
    scores = backend.score_tokens(scored_ids, top=5)
    plain = backend.token_logprobs(scored_ids)
    score_err = max(abs(s.logprob - p) for s, p in zip(scores, plain))
    ranked = all(len(s.top) == 5 and s.top[0][1] >= s.logprob - 1e-6 for s in scores)
    # the same chat with per-step log-probs (read on the GPU before the pipelined next step replays the graph)
    stepped = list(backend.chat([{"role": "user", "content": "Hello there"}], SP(max_new_tokens=24, logprobs=5)))
    steps = [s for c in stepped for s in c.scores]
    same_reply = [t for c in stepped for t in c.token_ids] == reply and [s.token for s in steps] == reply
    steps_best = all(s.top[0] == (s.token, s.logprob) for s in steps)
    step_err = max((abs(s.logprob - p.logprob) for s, p in zip(steps, scores[len(scored_ids) - len(reply) - 1:])),
                   default=0.0)
    # graph-replayed decoding logits against one full forward over the same tokens
    ids = backend.tokenize("The lighthouse keeper climbed the stairs and")
    step = backend._forward_step()
    got, tokens = [], list(ids)
    with torch.inference_mode():
        logits, cache = step(torch.tensor([ids], device="cuda"), None)
        for _ in range(24):
            got.append(logits[0, -1].float())
            tokens.append(int(logits[0, -1].argmax()))
            logits, cache = step(torch.tensor([[tokens[-1]]], device="cuda"), cache)
        full = backend.model(input_ids=torch.tensor([tokens], device="cuda"), use_cache=False).logits[0].float()
    from backends.gptq.decode_attention import decode_route
    route = decode_route(backend.model)
    ref = full[len(ids) - 1: len(ids) - 1 + len(got)]
    got = torch.stack(got)
    err = float((got - ref).norm() / ref.norm())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    lines = [f"### GPTQBackend on CUDA (smoke) - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - "
             f"{torch.cuda.get_device_name()} - commit {tree_commit()}", "",
             f"Command: `python -m bench.decode --smoke {' '.join(a for a in sys.argv[1:] if a != '--smoke')}`. "
             f"Random LLaMA ({args.layers} layers, 7B widths, vocab 49152), RTN {args.bits}-bit g{args.group}, loaded "
             f"through the registry's gptq backend with default options (float16, CUDA graphs, autotune), "
             f"attention kernel {'on' if args.attention_kernel else 'off'} "
             f"({route.calls if route else 0} routed calls from Python). "
             f"Layer paths: {', '.join(paths)}. Chat: {len(chunks) - 1} chunks, finish reason "
             f"{chunks[-1].finish_reason}, {len(reply)} token ids; score_tokens(top=5) over prompt + reply against "
             f"token_logprobs: worst difference {score_err:.1e}, alternatives ranked: {ranked}; the chat again with per-step "
             f"log-probs (logprobs=5): same reply {same_reply}, each greedy token its step's best {steps_best}, worst "
             f"difference from score_tokens {step_err:.1e}. Memory report: GPU {report.gpu_mb:.0f} MB, {report.bits_per_weight:.2f} "
             f"bits/weight. Graph decoding vs full forward over the same 24 steps: logits rel err {err:.1e}, top-1 "
             f"agreement {top1 * 100:.0f}%; graph captured: {backend._decoder.graph is not None}. Decoding attention "
             f"kernel alone against float64 at positions 0-255 split 1-7 ways, with and without the rotary inside "
             f"(32 heads over 8 kv heads, head 128, cache 256): worst rel err {max(kernel_err.values()):.1e}.", ""]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.md").write_text(text)
    print(text)
    backend.unload()
    shutil.rmtree(folder, ignore_errors=True)
    if not (score_err < 1e-3 and ranked and len(reply) == chunks[-1].generated_tokens):
        sys.exit("score_tokens disagrees with token_logprobs, or the chunks' token ids with the reply")
    if not (same_reply and steps_best and step_err < 0.1):
        sys.exit("per-step log-probs changed the reply, or disagree with its greedy tokens or with score_tokens")
    if not (err < 2e-2 and top1 >= 0.9 and backend is not None):
        sys.exit("graph decoding does not match the full forward")
    if max(kernel_err.values()) > 1e-2:
        sys.exit(f"the decoding attention kernel is wrong on this GPU: {kernel_err}")


def attention_kernel_errors() -> dict:
    """Relative error of the compiled decoding attention kernel against float64 on random caches, for
    positions that leave 0, 1 or several splits with cached content, on this GPU."""
    from backends.gptq.decode_attention import decode_attention, reference_attention
    from backends.gptq.kernel_runtime import SplitScratch
    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, dim, length = 32, 8, 128, 256
    scratch = SplitScratch()
    errors = {}
    for pos in (0, 1, 63, 64, 65, 130, 255):
        for splits in (1, 2, 4, 7):
            q = torch.randn(1, hq, 1, dim, device="cuda", generator=g).half()
            k, v = (torch.randn(1, hkv, 1, dim, device="cuda", generator=g).half() for _ in range(2))
            kc, vc = (torch.randn(1, hkv, length, dim, device="cuda", generator=g).half() for _ in range(2))
            kc[:, :, pos:] = float("nan")  # slots at and after the token: never read
            vc[:, :, pos:] = float("nan")
            angle = torch.linspace(0.1, 3.0, dim // 2, device="cuda") * (pos + 1)
            rotary = tuple(torch.cat([f(angle), f(angle)]).half() for f in (torch.cos, torch.sin))
            for rot in (None, rotary):  # rotary applied inside the kernel, as the routed attention does
                expected = reference_attention(q, k, v, kc, vc, pos, dim ** -0.5, rot)
                got = decode_attention(q, k, v, kc.clone(), vc.clone(), torch.tensor([pos], device="cuda"),
                                       dim ** -0.5, scratch, splits=splits, rotary=rot)
                err = float((got.double() - expected).norm() / expected.norm())
                errors[(pos, splits, rot is not None)] = err if err == err else float("inf")
    return errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ckpt", default="/tmp/gptq-webui-bench-7b")
    ap.add_argument("--no-fuse-norms", action="store_true", help="neither compiled norms, rotary nor MLP activation")
    ap.add_argument("--no-fuse-siblings", action="store_true")
    ap.add_argument("--act-order", action="store_true",
                    help="an act-order checkpoint (random perms, shared by q/k/v and by gate/up, as GPTQ's are)")
    ap.add_argument("--no-act-order-rewrites", action="store_true",
                    help="act-order: every gather inside the kernels (no act_order.py rewrites)")
    ap.add_argument("--attention-kernel", action="store_true",
                    help="--smoke/--profile-only: route decoding attention through our kernel (the full run "
                         "measures with and without it)")
    ap.add_argument("--pdl", action="store_true",
                    help="also decode with programmatic dependent launches (sm_90+): measured, not the backend's "
                         "default (no gain on an H200, bench/RESULTS.md)")
    ap.add_argument("--logprobs", type=int, default=None,
                    help="also time the last engine with each token's log-probs and this many alternatives")
    ap.add_argument("--cpu", action="store_true", help="CPU comparison on the default model instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="GPU check of the GPTQBackend class (see smoke_main)")
    ap.add_argument("--tokenizer", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--profile-only", action="store_true", help="only the gptq graph run and its kernel table")
    ap.add_argument("--profile", action="store_true",
                    help="also the kernel table of graph-replayed decoding steps")
    args = ap.parse_args(argv)
    if args.cpu:
        return cpu_main(args)
    if args.smoke:
        return smoke_main(args)
    if not torch.cuda.is_available():
        sys.exit("bench.decode needs a CUDA GPU")
    from bench.kernels import copy_bandwidth
    from backends.gptq.cuda_graph import GraphDecoder  # noqa: F811
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    config = llama7b_config(args.layers)
    folder = Path(args.ckpt)
    shutil.rmtree(folder, ignore_errors=True)
    t = time.time()
    fp16 = build_checkpoint(config, folder, args.bits, args.group, act_order=args.act_order)
    print(f"built and quantized in {time.time() - t:.0f} s", flush=True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
    results = {}
    if args.profile_only:
        del fp16
        torch.cuda.empty_cache()
        return profile_only(args, folder, prompt, device)

    # transformers fp16, eager, dynamic cache (what the transformers backend does)
    torch.cuda.reset_peak_memory_stats()
    results["transformers fp16 (eager)"] = dict(warm_then_time(fp16, prompt, args.new, None, device),
                                                peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    fp16_bytes = sum(p.numel() * p.element_size() for n_, p in fp16.named_parameters() if "embed_tokens" not in n_)
    print(results, flush=True)
    # greedy outputs of the two engines on the same weights should mostly agree (fp16 rounding aside)
    ref_tokens = _greedy_tokens(fp16, prompt, 32, None, device)
    max_len = cache_len(args)
    fp16_static = _greedy_tokens(fp16, prompt, 32, GraphDecoder(fp16, device, max_len).step, device)
    diag = {"fp16 static+graph vs fp16 dynamic": _agree(fp16_static, ref_tokens)}
    with torch.inference_mode():
        ref_logits = fp16(input_ids=torch.tensor([prompt], device=device)).logits.float()
    del fp16
    torch.cuda.empty_cache()

    # gptq: loader + static cache + CUDA graph
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    loaded, model, runtime = load_gptq(folder, device)
    print(f"gptq loaded in {time.time() - t:.0f} s", flush=True)
    with torch.inference_mode():
        q_logits = model(input_ids=torch.tensor([prompt], device=device)).logits.float()
    logit_err = float((q_logits - ref_logits).norm() / ref_logits.norm())
    top1 = float((q_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    print(f"prefill logits vs fp16: rel err {logit_err:.2e}, top-1 agreement {top1*100:.0f}%", flush=True)
    fused, rotary, groups = fuse_for_decoding(model, runtime, args)
    torch.cuda.empty_cache()
    with torch.inference_mode():
        f_logits = model(input_ids=torch.tensor([prompt], device=device)).logits.float()
    print(f"after fusing: logits vs unfused rel err {float((f_logits - q_logits).norm() / q_logits.norm()):.1e}",
          flush=True)
    decoder = GraphDecoder(model, device, max_len)
    row = warm_then_time(model, prompt, args.new, decoder.step, device)
    print(f"warm-up generation (tuning + capture) {row['warmup_s']:.0f} s, "
          f"graph={'yes' if decoder.graph is not None else 'NO'}", flush=True)
    results["gptq (static cache + CUDA graph)"] = dict(row, peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                                                      graph=decoder.graph is not None)
    decoder_eager = GraphDecoder(model, device, max_len, use_graph=False)
    results["gptq (static cache, eager)"] = warm_then_time(model, prompt, args.new, decoder_eager.step, device)
    gptq_tokens = _greedy_tokens(model, prompt, 32, GraphDecoder(model, device, max_len).step, device)
    gptq_dynamic = _greedy_tokens(model, prompt, 32, None, device)
    agree = _agree(gptq_tokens, ref_tokens)
    diag["gptq dynamic vs fp16 dynamic"] = _agree(gptq_dynamic, ref_tokens)
    diag["gptq static+graph vs gptq dynamic"] = _agree(gptq_tokens, gptq_dynamic)
    print("greedy agreement (first 32 tokens):", diag, flush=True)

    # the same model with the decoding attention routed through our kernel (cache write + attention in
    # one launch per layer): same weights, same run; its logits against the HF attention's, step by step
    from backends.gptq.decode_attention import decode_route, route_decode_attention
    hf_logits = torch_generation.greedy_logits(GraphDecoder(model, device, max_len).step, prompt, 23, device)
    routed = route_decode_attention(model)
    kernel_decoder, results["gptq (static cache + CUDA graph + attention kernel)"] = graph_decoding(
        model, prompt, args.new, device, max_len)
    kernel_logits = torch_generation.greedy_logits(GraphDecoder(model, device, max_len).step, prompt, 23, device,
                                                   tokens=hf_logits.argmax(-1).tolist())  # the same inputs
    route = decode_route(model)
    attention_check = dict(modules=routed, routed_calls=route.calls if route else 0,
                           rel_err=float((kernel_logits - hf_logits).norm() / hf_logits.norm()),
                           top1=float((kernel_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean()))
    print("attention kernel vs HF attention (24 graph steps):", attention_check, flush=True)
    # the profile below shows the routed engine: the model cannot go back, and the first decoder's graph
    # was captured before routing (a graph must be captured after the route, see route_decode_attention)
    decoder, tps = kernel_decoder, results["gptq (static cache + CUDA graph + attention kernel)"]["tok_s"]
    # then each residual add inside the norm that follows it (what the backend does), compiled by
    # torch.compile and through our kernel: same run, logits on the same tokens as the separate adds
    from backends.gptq.cuda_graph import fuse_residual_norms, residual_route
    attention_check["residual_layers"] = fuse_residual_norms(model)
    if args.act_order and not args.no_act_order_rewrites:
        from backends.gptq.act_order import presort_inputs
        attention_check["sorted_inputs"] = presort_inputs(model)
    for use_kernel, label in ((False, "torch.compile"), (True, "Triton kernel")):
        if not attention_check["residual_layers"]:
            break
        residual_route(model).use_kernel = use_kernel
        row = f"gptq (graph + attention kernel + adds in the norms, {label})"
        decoder, results[row] = graph_decoding(model, prompt, args.new, device, max_len)
        tps = results[row]["tok_s"]
        residual_logits = torch_generation.greedy_logits(GraphDecoder(model, device, max_len).step, prompt, 23, device,
                                                         tokens=hf_logits.argmax(-1).tolist())
        err = float((residual_logits - kernel_logits).norm() / kernel_logits.norm())
        top1 = float((residual_logits.argmax(-1) == kernel_logits.argmax(-1)).float().mean())
        attention_check[f"residual_{label}"] = dict(rel_err=err, top1=top1)
        print(f"adds in the norms ({label}) vs separate adds (24 graph steps, same tokens): rel err {err:.1e}, "
              f"top-1 {top1:.2f}", flush=True)
    if args.logprobs is not None:
        # the last engine again, then with each token's log-probs read from its step (the API's logprobs)
        last = list(results)[-1]
        results[f"{last}, again"] = warm_then_time(model, prompt, args.new, decoder.step, device)
        results[f"{last}, log-probs top {args.logprobs}"] = warm_then_time(model, prompt, args.new, decoder.step,
                                                                           device, logprobs=args.logprobs)
    from backends.gptq.kernel_runtime import pdl_supported
    if args.pdl and pdl_supported(device):
        # the same engine with programmatic dependent launches (a new graph: launches are captured as made)
        runtime.pdl = route.pdl = True
        pdl_decoder, results["gptq (graph + attention kernel + PDL)"] = graph_decoding(
            model, prompt, args.new, device, max_len)
        pdl_logits = torch_generation.greedy_logits(GraphDecoder(model, device, max_len).step, prompt, 23, device,
                                                    tokens=hf_logits.argmax(-1).tolist())
        attention_check["pdl_vs_no_pdl_rel_err"] = float((pdl_logits - kernel_logits).norm() / kernel_logits.norm())
        print("PDL vs no PDL logits (24 graph steps, same tokens): rel err "
              f"{attention_check['pdl_vs_no_pdl_rel_err']:.1e}", flush=True)
        decoder, tps = pdl_decoder, results["gptq (graph + attention kernel + PDL)"]["tok_s"]

    q_bytes = sum(l.kernel.nbytes() for l in loaded.quant_layers.values() if l.kernel is not None)
    q_bytes += sum({id(l.group): l.group.kernel.nbytes() for l in loaded.quant_layers.values()
                    if l.group is not None}.values())
    other = sum(p.numel() * p.element_size() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
    per_token = q_bytes + other
    limit = bw / per_token
    fp16_limit = bw / fp16_bytes
    md = [f"### Decode - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - {name} - commit {tree_commit()}", "",
          f"Command: `python -m bench.decode {' '.join(sys.argv[1:])}`. LLaMA-7B shape ({args.layers} layers, hidden 4096, "
          f"intermediate 11008, vocab 32000), random weights, RTN {args.bits}-bit g{args.group}; prompt {args.prompt} "
          f"tokens, {args.new} new tokens, greedy, batch 1, after a warm-up generation; torch {torch.__version__}. "
          f"Copy bandwidth this run {bw/1e9:.0f} GB/s. Bytes read per token: gptq {per_token/1e9:.2f} GB "
          f"(limit {limit:.0f} tok/s), fp16 {fp16_bytes/1e9:.2f} GB (limit {fp16_limit:.0f} tok/s). "
          f"Same weights: prefill logits of gptq vs fp16 differ by {logit_err:.1e} (relative), top-1 agrees on "
          f"{top1*100:.0f}% of the {args.prompt} positions; greedy continuations (first 32 tokens, common prefix): "
          + ", ".join(f"{k} {v*100:.0f}%" for k, v in diag.items()) + f". Norms fused by torch.compile: {fused}; rotary compiled: {rotary}; sibling projections fused into one launch: {groups} groups. "
          f"Attention kernel ({attention_check['modules']} modules routed, {attention_check['routed_calls']} routed calls "
          f"from Python, i.e. eager steps and captures) against the HF attention over 24 graph-decoded "
          f"steps fed the same tokens: logits rel err {attention_check['rel_err']:.1e}, top-1 agreement {attention_check['top1'] * 100:.0f}%.", "",
          "| engine | decode tok/s | x fp16 | % of limit | TTFT ms | peak GPU GB | warm-up generation tok/s |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    base = results["transformers fp16 (eager)"]["tok_s"]
    for k, r in results.items():
        lim = fp16_limit if k.startswith("transformers") else limit
        md.append(f"| {k} | {r['tok_s']:.1f} | {r['tok_s']/base:.2f} | {r['tok_s']/lim*100:.0f} | "
                  f"{r['ttft_ms']:.1f} | {r.get('peak_gb', float('nan')):.1f} | {r.get('warmup_tok_s', float('nan')):.1f} |")
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.md").write_text(text)
    (out / "decode.json").write_text(json.dumps(dict(results=results, copy_bw=bw, bytes_per_token=per_token,
                                                     agree=agree, diag=diag, logit_err=logit_err, top1=top1, attention_check=attention_check, configs={k: v.__dict__ for k, v in runtime.configs.items()}),
                                                indent=1))
    print(text, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    if args.profile:  # last: a failing diagnostic must not cost the benchmark's numbers
        table = profile_table(decoder, prompt, device, tps)
        (out / "decode.md").write_text(text + f"\nWhere a decoding step's GPU time goes (gptq, graph, attention kernel{', adds in the norms' if attention_check.get('residual_layers') else ''}{' + PDL' if runtime.pdl else ''}):\n\n{table}")
        print(table)


def graph_decoding(model, prompt, new: int, device, max_len: int):
    """A fresh GraphDecoder of the model as it is now (a graph replays the launches it captured), warmed
    up, then timed over `new` tokens: (decoder, result row)."""
    from backends.gptq.cuda_graph import GraphDecoder
    decoder = GraphDecoder(model, device, max_len)
    row = warm_then_time(model, prompt, new, decoder.step, device)
    return decoder, dict(row, peak_gb=torch.cuda.max_memory_allocated() / 1e9, graph=decoder.graph is not None)


def cache_len(args) -> int:
    """Static cache slots for a prompt and its new tokens, rounded up to 256 (one graph per length)."""
    return -(-(args.prompt + args.new + 1) // 256) * 256


def load_gptq(folder: Path, device, tuner_cache: Path | None = None, gpu_layers: int | None = None):
    """The checkpoint through the gptq backend's loader with a tuning kernel runtime, as the backend
    loads it on CUDA (tuner_cache: the configs file, shared by engines of one run; gpu_layers: see
    load_checkpoint): (loaded, model, runtime)."""
    from backends.gptq.kernel_runtime import KernelRuntime
    from backends.gptq.loader import load_checkpoint
    runtime = KernelRuntime(tune=True, cache_file=tuner_cache)
    loaded = load_checkpoint(folder, device, torch.float16, runtime=runtime, gpu_layers=gpu_layers)
    runtime.reserve_workspace([l.kernel for l in loaded.quant_layers.values()], torch.float16, device)
    return loaded, loaded.model.eval(), runtime


def fuse_for_decoding(model, runtime, args):
    """The backend's decoding fusions (GPTQBackend._build_model), each unless switched off: (norms
    compiled, rotary compiled, sibling groups fused)."""
    from backends.gptq import act_order
    from backends.gptq.cuda_graph import fuse_gated_activation, fuse_norms, fuse_rotary
    from backends.gptq.fusion import fuse_siblings
    rewrites = not getattr(args, "no_act_order_rewrites", False)
    if rewrites:
        act_order.fold_mlp_orders(model)
    norms = 0 if args.no_fuse_norms else fuse_norms(model)
    rotary = False if args.no_fuse_norms else fuse_rotary(model)
    if not args.no_fuse_norms:
        fuse_gated_activation(model)
    groups = 0 if args.no_fuse_siblings else fuse_siblings(model, runtime)
    if getattr(args, "attention_kernel", False):
        from backends.gptq.decode_attention import route_decode_attention
        route_decode_attention(model, pdl=runtime.pdl)
        if not args.no_fuse_norms:
            from backends.gptq.cuda_graph import fuse_residual_norms
            fuse_residual_norms(model)
            if rewrites:
                act_order.presort_inputs(model)
    return norms, rotary, groups


def profile_only(args, folder: Path, prompt, device) -> None:
    """The gptq engine alone, set up as main() sets it up, then the kernel table of its decoding step."""
    from backends.gptq.cuda_graph import GraphDecoder
    from backends.gptq.kernel_runtime import pdl_supported
    _, model, runtime = load_gptq(folder, device)
    runtime.pdl = bool(args.pdl) and pdl_supported(device)
    fuse_for_decoding(model, runtime, args)
    decoder = GraphDecoder(model, device, cache_len(args))
    run_generation(model, prompt, 16, decoder.step, device)
    _, tps, _ = run_generation(model, prompt, args.new, decoder.step, device)
    table = profile_table(decoder, prompt, device, tps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.md").write_text(f"### Decode step profile - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - "
                                    f"{torch.cuda.get_device_name()} - commit {tree_commit()}\n\nCommand: "
                                    f"`python -m bench.decode {' '.join(sys.argv[1:])}`.\n\n{table}")
    print(table)
    shutil.rmtree(folder, ignore_errors=True)


def kernel_us(event) -> float:
    """GPU microseconds of a profiler event (torch renamed cuda_time_total to device_time_total)."""
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)


def profile_table(decoder, prompt, device, tps: float, steps: int = 48) -> str:
    """The decoding step's GPU time by kernel, from `steps` graph-replayed steps under the profiler
    (the decoder's own step, positions advancing), against the step time without per-token host work
    and a token through the sampling loop: what is kernels, what is gaps, what is host."""
    from torch.profiler import ProfilerActivity, profile
    if len(prompt) + steps + 2 > decoder.max_len:  # each run() starts again from the prompt
        raise ValueError("the static cache is too short for the profile")

    def run(n):
        tok = torch.tensor([[prompt[-1]]], device=device)
        with torch.inference_mode():
            _, cache = decoder.step(torch.tensor([prompt], device=device), None)
            for _ in range(2):  # eager step, then capture (the graph exists after the warm-up already)
                _, cache = decoder.step(tok, cache)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                _, cache = decoder.step(tok, cache)
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / max(n, 1) * 1e3

    step_ms = run(steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(steps)
    rows = {}
    for ev in prof.key_averages():
        us = kernel_us(ev)
        if us > 0:
            rows[ev.key] = (us, ev.count)
    # the prefill and the two warm steps are profiled too: count per decoding step from the launches
    # of the step's most frequent kernel family would be fragile, so subtract a prefill-only profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof0:
        run(0)
    for ev in prof0.key_averages():
        us = kernel_us(ev)
        if ev.key in rows:
            u, c = rows[ev.key]
            rows[ev.key] = (u - us, c - ev.count)
    rows = {k: (u / steps, c / steps) for k, (u, c) in rows.items() if u > 0 and c > 0}
    total = sum(v[0] for v in rows.values())
    lines = [f"Per token: sampling loop {1e3 / tps:.3f} ms ({tps:.1f} tok/s), graph step without host sync "
             f"{step_ms:.3f} ms, kernel time {total / 1e3:.3f} ms in {sum(v[1] for v in rows.values()):.0f} kernels.",
             "", "| kernel | us per token | launches per token | share |", "| --- | --- | --- | --- |"]
    for key, (us, cnt) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"| {key[:110].replace('|', '/')} | {us:.1f} | {cnt:.1f} | {us / total * 100:.1f}% |")
    return "\n".join(lines) + "\n"


def _agree(a, b) -> float:
    """Fraction of the first tokens that agree before the two greedy continuations first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / len(b)


def _greedy_tokens(model, prompt, n, forward, device):
    """The n greedy tokens after the prompt through `forward` (HF's dynamic cache when None)."""
    step = forward or torch_generation._default_forward(model)
    return torch_generation.greedy_logits(step, prompt, n - 1, device).argmax(-1).tolist()


if __name__ == "__main__":
    main()
