"""Entry parsing, output formats and the tab's pure helpers (no model needed)."""
from __future__ import annotations

import csv
import io
import json

import pytest

from bench.compare_core import (RESULT_KEYS, Entry, Result, fairness_notes, format_table, parse_entry,
                                to_csv, to_json)


def test_parse_entry_forms():
    assert parse_entry("transformers:models/SmolLM2-135M-Instruct") == Entry("transformers", "models/SmolLM2-135M-Instruct")
    e = parse_entry("bitsandbytes:models/SmolLM2-135M-Instruct:quant=nf4,double_quant=true")
    assert e.backend == "bitsandbytes" and e.path == "models/SmolLM2-135M-Instruct"
    assert e.options_dict == {"quant": "nf4", "double_quant": "true"}
    assert e.label == "bitsandbytes:models/SmolLM2-135M-Instruct:quant=nf4,double_quant=true"
    assert parse_entry("llama.cpp:models/x.Q4_1.gguf").backend == "llama.cpp"
    for bad in ("transformers", "transformers:", ":models/x"):
        with pytest.raises(ValueError):
            parse_entry(bad)
    with pytest.raises(ValueError, match="key=value"):
        parse_entry("bitsandbytes:m:quant=nf4,oops")


def _results():
    return [Result("transformers:m", "transformers", 32.0, 256.6, 513.1, 0.0, 29.2, 400.0, 20.0, 0.3),
            Result("bitsandbytes:m:quant=nf4", "bitsandbytes", 4.5, 256.6, 165.1, 0.0, 33.0, 300.0, 10.0, 0.4),
            Result("llama.cpp:missing.gguf", "llama.cpp", error="'missing.gguf': no such model")]


def test_json_has_exactly_the_issue_schema():
    data = json.loads(to_json(_results()))
    assert [list(item) for item in data] == [list(RESULT_KEYS)] * 3
    assert data[0]["error"] is None and data[2]["ppl"] is None and "no such model" in data[2]["error"]
    assert data[1]["bits_per_weight"] == 4.5


def test_csv_and_table():
    rows = list(csv.DictReader(io.StringIO(to_csv(_results()))))
    assert [r["entry"] for r in rows] == ["transformers:m", "bitsandbytes:m:quant=nf4", "llama.cpp:missing.gguf"]
    assert float(rows[1]["ppl"]) == 33.0 and rows[2]["ppl"] == ""
    table = format_table(_results()).splitlines()
    assert table[0].startswith("| entry | bits/w |") and len(table) == 5
    assert "| 0.50x |" in table[3]  # decode speed relative to the first entry of the same run
    assert "no such model" in table[4]


def test_fairness_note_only_when_tokenizations_differ():
    a, b, c = _results()
    a.eval_tokens = b.eval_tokens = 508
    assert fairness_notes([a, b, c]) == []
    b.eval_tokens = 500
    assert "tokenized the text differently" in fairness_notes([a, b, c])[0]


def test_tab_helpers():
    from webui.compare_tab import MAX_ENTRIES, entries_from_form, plot_frames
    form = ["SmolLM2-135M-Instruct", "transformers", "", "", "auto", "",
            "SmolLM2-135M-Instruct", "bitsandbytes", "quant=nf4", None, "auto", ""]
    entries = entries_from_form(form)
    assert [e.label for e in entries] == ["transformers:SmolLM2-135M-Instruct",
                                          "bitsandbytes:SmolLM2-135M-Instruct:quant=nf4"]
    assert MAX_ENTRIES == 4
    memory, speed = plot_frames(_results())
    assert list(memory["entry"]) == ["1. transformers", "2. bitsandbytes"]
    assert list(memory["memory MB"]) == [513.1, 165.1]
    assert list(speed["bar"]) == ["1. transformers prefill", "1. transformers decode",
                                  "2. bitsandbytes prefill", "2. bitsandbytes decode"]
    assert list(speed["tokens/s"]) == [400.0, 20.0, 300.0, 10.0]


def test_text_sources():
    from bench.compare_core import TEXT_SOURCES, eval_text
    from backends.base import BackendError
    text = eval_text("builtin")  # offline prose, the same on every run
    assert len(text) > 100_000 and text == eval_text("builtin") and "\n\n" in text
    assert set(TEXT_SOURCES) == {"wikitext2", "c4", "ptb", "builtin"}
    with pytest.raises(BackendError, match="no such"):
        eval_text("/nonexistent/file.txt")


def test_options_help_comes_from_capabilities():
    from webui.compare_tab import options_help
    text = options_help()
    assert "**bitsandbytes**: `quant` (nf4 / fp4 / int8) default `nf4`" in text
    assert "**llama.cpp**" in text and "`n_threads`" in text
