"""BENCH.md section 3: quantization time and memory, GPTQ against RTN through the same streaming
pipeline in the same run (the ratio is GPTQ's cost over pure streaming: read, forward, pack, write).

    CPU:  python -m bench.quantize_speed --nsamples 128 --seqlen 512 --record
    GPU:  python -m bench.quantize_speed --random-7b --nsamples 128 --seqlen 2048 --act-order both --record
    Generated calibration text against streamed text, same run:
          python -m bench.quantize_speed --random-7b --calib builtin,generated --no-baseline --record

--random-7b writes a LLaMA-7B-shaped model with random fp16 weights (hidden 4096, intermediate 11008,
32 layers, 32 heads) to models/bench-random-7b/ one layer at a time (never whole in RAM), with the
byte-level BPE tokenizer trained offline on the builtin calibration prose (vocabulary 32000). Reports wall time, peak process RSS, peak RSS +
swap, and peak GPU memory (torch allocator peak and device-wide), sampled every 0.5 s."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# run as a file (`python bench/...py`), Python puts bench/ first on the path, where bench/kernels.py shadows the
# `kernels` package transformers imports (loading a tokenizer failed): only the repository root goes there
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from quantizer.jobs import JobManager  # noqa: E402
from quantizer.service import start_quantize  # noqa: E402
from quantizer.settings import QuantizeSettings  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402

DEFAULT = "SmolLM2-135M-Instruct"
RANDOM = "bench-random-7b"


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the builtin calibration prose (offline, a few seconds):
    the random model needs no other model's files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from quantizer.calibration import builtin_documents
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_documents(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(str(folder))


def make_random_7b(models_dir: Path, layers: int = 32, seed: int = 0) -> str:
    """Write the random model shard by shard (one decoder layer per shard)."""
    from safetensors.torch import save_file
    folder = models_dir / RANDOM
    if (folder / "model.safetensors.index.json").exists():
        if json.loads((folder / "config.json").read_text()).get("num_hidden_layers") == layers:
            return RANDOM
        shutil.rmtree(folder)  # kept from a run with another --layers
    tmp = models_dir / (RANDOM + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hidden, inter, heads, vocab = 4096, 11008, 32, 32000
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": hidden // heads, "vocab_size": vocab,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
              "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).half().cpu()

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    weight_map = {}
    total = layers + 1
    for i in range(layers):
        tensors = {f"model.layers.{i}.{n}.weight": rand(*s) for n, s in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        shard = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
        del tensors
    shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    weight_map.update({k: shard for k in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)
    return RANDOM


def measure(models_dir: Path, model: str, settings: QuantizeSettings) -> dict:
    out = f"bench-speed-{settings.method}-{int(time.time())}"
    jobs = JobManager(sample_interval=0.5)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    job = start_quantize(jobs, models_dir, model, out, settings)
    job.wait()
    wall = time.perf_counter() - t0
    if job.status != "done":
        raise SystemExit(f"{settings.method} failed: {job.error}")
    result = job.result
    shutil.rmtree(result.output, ignore_errors=True)
    rss = job.peak("rss_mb")
    timed = [entry for entry in result.layers if entry.get("timing")]
    stages = {key: round(sum(e["timing"].get(key, 0.0) for e in timed) / max(len(timed), 1), 3)
              for key in (timed[0]["timing"] if timed else {})}
    generation = sum(e.get("generation_s", 0.0) for e in job.events)
    return {"method": settings.method, "act_order": settings.act_order, "calib": settings.calib, "seconds": wall,
            "generation_s": generation,
            "layers": len(result.layers), "layer_s": round(sum(e["seconds"] for e in result.layers)
                                                            / max(len(result.layers), 1), 3),
            "layer_stages_s": stages,
            "peak_rss_mb": rss, "start_rss_mb": job.baseline_rss_mb, "peak_anon_mb": job.peak("anon_mb"),
            "peak_rss_swap_mb": max(s["rss_mb"] + s["swap_used_mb"] for s in job.sampler.snapshot()),
            "peak_gpu_alloc_mb": result.peak_gpu_mb, "peak_gpu_device_mb": job.peak("gpu_used_mb"),
            "activations": result.activations, "device": result.device}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--random-7b", action="store_true", help="create and use the 7B-shaped random model")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the random model")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--calib", default="c4", help="c4 (local shared sample), builtin (always offline) or generated "
                    "(the model writes it); several, comma-separated, run one after the other")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", choices=("off", "on", "both"), default="off",
                    help="on = act-order with static groups, the quantizer's default (both: off, then on)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the RTN run")
    ap.add_argument("--keep-random", action="store_true", help="keep models/bench-random-7b afterwards")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    model = make_random_7b(args.models_dir, args.layers) if args.random_7b else args.model
    calibs = [c.strip() for c in args.calib.split(",") if c.strip()]
    base = dict(bits=args.bits, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen,
                batch_size=args.batch_size)
    runs = []
    if not args.no_baseline:
        runs.append(QuantizeSettings(method="rtn", calib=calibs[0], **base))
    orders = {"off": [False], "on": [True], "both": [False, True]}[args.act_order]
    runs += [QuantizeSettings(method="gptq", act_order=a, static_groups=a, calib=c, **base)
             for c in calibs for a in orders]
    # RSS counts the mmapped checkpoint's file pages; the anonymous part is what the job allocated itself
    header_lines = ["| method | act-order | calibration | wall s | of which generation s | vs RTN | peak RSS MB (start) | peak anonymous MB | peak RSS+swap MB | peak GPU MB (alloc / device) | activations on |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = REPO / "bench" / "RESULTS.md"
    if args.record:  # header first, then each row as soon as it is measured (a killed run keeps its rows)
        device = (torch.cuda.get_device_name() if torch.cuda.is_available()
                  else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
        commit = tree_commit()
        what = "7B-shaped random model" if args.random_7b else args.model
        header = (f"\n### Quantization speed and memory ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {device}, commit {commit})\n"
                  f"Command: `python -m bench.quantize_speed {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
                  f"{what}, {args.bits}-bit g{args.group_size}, {args.nsamples} x {args.seqlen} {args.calib} tokens; "
                  "RTN runs the same streaming pipeline (the baseline of the ratio).\n\n")
        with open(results, "a", encoding="utf-8") as fh:
            fh.write(header + "\n".join(header_lines) + "\n")
    rows, lines, rtn = [], list(header_lines), None
    for settings in runs:
        r = measure(args.models_dir, model, settings)
        rows.append(r)
        print(json.dumps(r), flush=True)
        rtn = rtn or (r if r["method"] == "rtn" else None)
        ratio = f"{r['seconds'] / rtn['seconds']:.2f}x" if rtn else ""
        line = (f"| {r['method']} | {'on (static groups)' if r['act_order'] else 'off'} | {r['calib']} | {r['seconds']:.1f} | "
                f"{r['generation_s']:.1f} | {ratio} | "
                f"{r['peak_rss_mb']:.0f} ({r['start_rss_mb']:.0f}) | {r['peak_anon_mb']:.0f} | {r['peak_rss_swap_mb']:.0f} | "
                f"{r['peak_gpu_alloc_mb']:.0f} / {r['peak_gpu_device_mb']:.0f} | {r['activations']} |")
        lines.append(line)
        if args.record:
            with open(results, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
    if args.random_7b and not args.keep_random:
        shutil.rmtree(args.models_dir / RANDOM, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
