"""The GPU benchmarks, run where there is no GPU (this machine, CI, a laptop): each imports, parses its
arguments and stops with a sentence saying it needs CUDA, instead of a traceback halfway through."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("module", ["bench.tune_time", "bench.offload", "bench.load_cycles", "bench.kernels",
                                    "bench.gemv_sweep", "bench.ncu_profile", "bench.mode8_probe",
                                    "bench.mode5_blocks", "bench.act_order", "bench.copies_probe",
                                    "bench.load_rss_probe"])
def test_gpu_benchmarks_say_they_need_cuda(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"{module} needs a CUDA GPU"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_generated_speed_asked_for_a_gpu_says_it_needs_one():
    result = subprocess.run([sys.executable, "-m", "bench.generated_speed", "--device", "cuda"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "bench.generated_speed --device cuda needs a CUDA GPU"


def test_generated_speed_on_the_cpu_times_both_caches(default_hf_model):
    """The CPU form of bench.generated_speed: the in-place cache against the concatenating one on the default
    model, same rows, in one table row."""
    result = subprocess.run([sys.executable, "-m", "bench.generated_speed", "--device", "cpu", "--threads", "1",
                             "--rows", "2", "--tokens", "24", "--models-dir", str(default_hf_model.parent),
                             "--model", default_hf_model.name], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "cpu x1" and row[3].strip() == "2 x 24", row
    assert row[4].strip().startswith("concatenating cache") and row[5].strip().startswith("in-place cache"), row
    # whether both sampled the same text (one rounding difference between attention kernels can change it)
    assert float(row[6].strip().rstrip("x")) > 0 and row[7].strip() in ("same tokens", "tokens differ (rounding)"), row


def test_ncu_summary_reads_the_raw_page():
    """bench.ncu_profile --summarize: ncu's raw page (a header row, a units row, a row per kernel) becomes
    one block per kernel with its metrics and its stall reasons, largest first."""
    from bench.ncu_profile import summary_of_raw_csv
    header = ["ID", "Kernel Name", "launch__grid_size", "launch__block_size", "gpu__time_duration.sum",
              "smsp__issue_active.avg.pct_of_peak_sustained_active",
              "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_long_scoreboard_not_issued_per_issue_active.ratio"]
    units = ["", "", "", "", "us", "%", "", "", "", ""]
    rows = [["0", "gptq_mma4_kernel", "1,792", "128", "65.25", "35.18", "1.41", "4.29", "1.18", "9.99"],
            ["1", "gptq_gemv_h2_kernel", "504", "128", "38.72", "56.59", "0.19", "2.80", "0.77", "9.99"]]
    raw = "\n".join(",".join(f'"{v}"' for v in r) for r in [header, units] + rows)
    out = summary_of_raw_csv(raw).split("== ")[1:]
    assert len(out) == 2 and out[0].startswith("gptq_mma4_kernel  (grid 1,792, block 128)")
    first = out[0].splitlines()
    assert any(l.split() == ["duration", "65.25", "us"] for l in first), first
    assert any(l.split() == ["issue", "active", "%", "35.18", "%"] for l in first), first
    assert first[-1].endswith(": long_scoreboard 4.29, barrier 1.41, wait 1.18")  # not_issued ratios left out
    assert out[1].startswith("gptq_gemv_h2_kernel")
    assert out[1].splitlines()[-1].endswith(": long_scoreboard 2.80, wait 0.77, barrier 0.19")
    assert "no kernel" in summary_of_raw_csv(",".join(header))


def test_ncu_source_page_summary_splits_samples_around_the_k_loop():
    """bench.ncu_profile --sources: the stall samples of ncu's per-instruction page, split before, in and
    after the kernel's longest backward-branch loop, and the instructions holding most with their reason."""
    from bench.ncu_profile import summary_of_source_csv
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_long_sb", "stall_barrier",
              "stall_long_sb (Not Issued)"]
    code = [("0x7f00", "LDG.E R2, desc[UR4][R4.64]", 10, 10, 0, 99),   # before the loop
            ("0x7f10", "LDS R6, [R8]", 5, 0, 5, 0),                     # loop start (the branch's target)
            ("0x7f20", "IMAD R9, R2, R6, RZ", 60, 55, 5, 0),
            ("0x7f30", "BRA 0x7f10", 5, 0, 5, 0),                       # loop end
            ("0x7f40", "STG.E desc[UR4][R4.64], R9", 20, 0, 20, 0)]     # after
    raw = "\n".join(",".join(f'"{v}"' for v in r) for r in
                    [["Kernel Name", "k"], header] + [list(c) for c in code])
    lines = summary_of_source_csv(raw, top=2).splitlines()
    assert lines[0].split() == ["100", "samples:", "10%", "before", "the", "K", "loop,", "70%", "in", "it",
                                "(3", "instructions),", "20%", "after"]
    assert lines[1].split()[:3] == ["60.0%", "long_sb", "loop"] and lines[1].endswith("IMAD R9, R2, R6, RZ")
    assert lines[2].split()[:3] == ["20.0%", "barrier", "after"]  # not-issued columns are not reasons
    assert "no Address" in summary_of_source_csv("a,b\n1,2")


def test_ncu_pick_only_needs_a_file_to_write_to():
    result = subprocess.run([sys.executable, "-m", "bench.ncu_profile", "--pick-only"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().endswith("--pick-only writes its picks to --picks FILE")


def test_the_commit_stamp_says_when_the_tree_differs_from_it(tmp_path, monkeypatch):
    """A benchmark's stamp names the commit and marks a tree whose tracked files differ from it: the GPU
    machine's stale .git once stamped a run with a commit whose files were not the ones measured."""
    import subprocess

    from bench.provenance import tree_commit
    monkeypatch.delenv("GPTQ_WEBUI_COMMIT", raising=False)
    assert tree_commit(tmp_path) == "?"  # not a repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "kernel.py").write_text("v = 1\n")
    subprocess.run(git + ["add", "kernel.py"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert tree_commit(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert tree_commit(tmp_path) == head
    (tmp_path / "kernel.py").write_text("v = 2\n")
    assert tree_commit(tmp_path) == f"{head}-dirty"
    monkeypatch.setenv("GPTQ_WEBUI_COMMIT", "abc1234")
    assert tree_commit(tmp_path) == "abc1234"


def test_every_benchmark_stamps_its_commit_through_provenance():
    """One stamp for all reports: a benchmark asking git for HEAD itself would name a stale commit on the
    GPU machine without saying so (bench.provenance)."""
    stampers = [p for p in (REPO / "bench").glob("*.py") if "commit" in p.read_text() and p.name != "provenance.py"]
    assert len(stampers) >= 7
    for path in stampers:
        source = path.read_text()
        assert "rev-parse" not in source, path.name
        assert "commit {tree_commit()}" in source or "commit: {tree_commit()}" in source or "= tree_commit()" in source, path.name


def test_mode8_probe_names_its_cases_as_bench_kernels_does():
    """bench.mode8_probe takes 'KxN:case:rows' with bench.kernels' case names (mode 8's widths, 8 bits
    included), and refuses an act-order or unknown case by naming the ones it takes, before any GPU work."""
    from bench.mode8_probe import parse_case
    assert parse_case("8192x28672:2g64:1") == (8192, 28672, 2, 64, 1)
    assert parse_case("4096x11008:4g128:16") == (4096, 11008, 4, 128, 16)
    assert parse_case("4096x11008:8g128:1") == (4096, 11008, 8, 128, 1)
    for bad in ("4096x11008:4g128a:16", "4096x11008:5g128:1"):
        with pytest.raises(SystemExit, match=r"unknown case .*\(one of 4g128, 3g128, 2g64, 2g128, 8g128"):
            parse_case(bad)


def test_copies_probe_names_its_cases_as_bench_kernels_does():
    """bench.copies_probe takes 'KxN:case,...' with bench.kernels' case names, act-order included, and
    refuses an unknown case by naming the ones it takes, before any GPU work."""
    from bench.copies_probe import parse_cases
    assert parse_cases("8192x28672:2g64,4096x11008:4g128a") == [(8192, 28672, 2, 64, False),
                                                                (4096, 11008, 4, 128, True)]
    with pytest.raises(SystemExit, match=r"unknown case '5g128' \(one of 4g128, 4g128a"):
        parse_cases("4096x11008:5g128")


def test_act_order_prompt_ratios_compare_engines_whose_prompts_run_alike():
    """bench.act_order's prompt table: an engine with prompts off the residual route is set against the
    engine without act-order whose prompts are off it too, not against the routed one."""
    from bench.act_order import prompt_table
    nan = float("nan")
    rows = [("no act-order", 400.0, (0, 0), {16: (10.0, 4.0), 512: (30.0, 20.0)}, True),
            ("act-order, rewritten (the backend)", 399.0, (32, 0), {16: (11.0, 4.2), 512: (30.0, 20.2)}, True),
            ("no act-order, prompts off the residual route", nan, (0, 0),
             {16: (20.0, 5.0), 512: (40.0, 22.0)}, False),
            ("the backend, prompts off the residual route", nan, (96, 0),
             {16: (21.0, 5.5), 512: (40.0, 22.0)}, False)]
    md = prompt_table(rows, [16, 512])
    assert md[2] == ("| engine | gathers | 16 tokens: wall ms (x) | kernels ms (x) | 512 tokens: wall ms (x) "
                     "| kernels ms (x) |")
    assert md[4] == "| no act-order | 0 | 10.00 (1.000) | 4.000 (1.000) | 30.00 (1.000) | 20.000 (1.000) |"
    assert md[5] == ("| act-order, rewritten (the backend) | 32 | 11.00 (1.100) | 4.200 (1.050) | 30.00 (1.000) "
                     "| 20.200 (1.010) |")
    assert md[7] == ("| the backend, prompts off the residual route | 96 | 21.00 (1.050) | 5.500 (1.100) | 40.00 (1.000) "
                     "| 22.000 (1.000) |")


def test_gemv_sweep_grid_options_belong_to_mode_4(capsys):
    """--block-n/--block-k/--warps narrow mode 4's grid; with another mode they would be ignored, so they are
    refused with a message, before any GPU work."""
    from bench.gemv_sweep import int_list, main
    assert int_list("32,16,64") == (32, 16, 64)
    with pytest.raises(SystemExit) as stop:
        main(["--mode", "8", "--block-n", "32"])
    assert stop.value.code == 2 and "set mode 4's grid" in capsys.readouterr().err


def test_gemv_sweep_takes_register_caps_ptxas_accepts():
    """bench.gemv_sweep --registers: comma-separated caps, 0 for none; a cap ptxas would refuse (or a typo) is
    an argparse error naming the value, before any GPU work."""
    import argparse

    from bench.gemv_sweep import register_caps
    assert register_caps("0,200,248") == [0, 200, 248]
    for bad in ("300", "0,abc", "16", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="24-255"):
            register_caps(bad)
    result = subprocess.run([sys.executable, "-m", "bench.gemv_sweep", "--registers", "300"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "'300'" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["bench/quantize_quality.py", "--no-fp", "--variant", "rtn:method=rtn,bits=4,group_size=128", "--calib", "builtin",
     "--nsamples", "1", "--seqlen", "64", "--windows", "1"],
    ["bench/quantize_speed.py", "--calib", "builtin,generated", "--nsamples", "1", "--seqlen", "32", "--no-baseline"]],
    ids=["quantize_quality", "quantize_speed"])
def test_cpu_benchmarks_run_as_files(command, default_hf_model, wikitext_path, tmp_path):
    """Run as files (`python bench/x.py`), Python puts bench/ first on the path, where bench/kernels.py
    shadowed the `kernels` package transformers imports: loading the tokenizer failed. A tiny real run of each."""
    import shutil
    models = tmp_path / "models"
    shutil.copytree(default_hf_model, models / default_hf_model.name)
    result = subprocess.run([sys.executable, *command, "--models-dir", str(models)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "| " in result.stdout  # the table printed last
    if "quantize_speed" in command[0]:  # one job per source, generation's seconds in its own column
        rows = {line.split("|")[3].strip(): line.split("|") for line in result.stdout.splitlines()
                if line.startswith("| gptq |")}
        assert sorted(rows) == ["builtin", "generated"], result.stdout[-2000:]
        assert float(rows["builtin"][5]) == 0.0 and float(rows["generated"][5]) > 0.0
        for row in rows.values():  # the anonymous part of RSS, a column of its own (RSS counts mmapped files)
            assert 0 < float(row[8]) <= float(row[7].split()[0]), row
    assert sorted(p.name for p in models.iterdir()) == [default_hf_model.name]  # its checkpoints cleaned up
