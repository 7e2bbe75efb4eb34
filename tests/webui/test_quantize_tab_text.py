"""The Quantize tab's text: the progress line and the perplexity comparison."""
from quantizer.service import PerplexityComparison
from webui.quantize_tab import comparison_markdown, progress_html


def job(status: str, stage: str) -> dict:
    return {"status": status, "progress": 1.0 if status == "done" else 0.5, "stage": stage, "elapsed": 71.2}


def test_progress_names_the_stage_only_while_running():
    assert "running · 50% · layer 3/30 · 71 s" in progress_html(job("running", "layer 3/30"))
    done = progress_html(job("done", "finishing"))
    assert "done · 100% · 71 s" in done and "finishing" not in done
    assert "No quantization job yet" in progress_html(None)


def test_comparison_gives_the_change_against_the_original():
    text = comparison_markdown(PerplexityComparison("wikitext2", 512, 4, {"base": 30.0, "base-4bit": 31.5}))
    assert text.splitlines()[0] == "- **base**: ppl 30.000"
    assert text.splitlines()[1] == "- **base-4bit**: ppl 31.500 (+5.0% against base)"
    assert text.endswith("The same 4 windows of 512 tokens of wikitext2 for each; lower is better.")
    one = comparison_markdown(PerplexityComparison("c4", 256, 1, {"a": 10.0, "b": 9.0}))
    assert "(-10.0% against a)" in one and "The same 1 window of 256 tokens of c4" in one
