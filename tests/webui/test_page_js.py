"""Every read-only textbox the server writes into (the quantize log, the compare replies) follows its
newest line in the page; the browser tests of the Quantize tab watch it happen."""
import pytest

from webui.page_js import follow_newest_js


@pytest.fixture(scope="module")
def page_config(tmp_path_factory, models_dir):
    from webui.app import build_app
    from webui.context import AppContext
    ctx = AppContext.create(models_dir=models_dir, data_dir=tmp_path_factory.mktemp("page-js-data"))
    demo = build_app(ctx)
    yield demo.get_config_file()
    demo.close()


def test_each_read_only_textbox_follows_its_newest_line(page_config):
    components = {c["id"]: c for c in page_config["components"]}
    read_only = {cid: c["props"]["elem_id"] for cid, c in components.items()
                 if c.get("type") == "textbox" and c["props"].get("interactive") is False}
    assert {"quant-log", "compare-reply-0", "compare-reply-3"} <= set(read_only.values())
    following = {target[0] for dep in page_config["dependencies"] if "box.scrollHeight" in (dep.get("js") or "")
                 for target in dep["targets"] if target[1] == "change"}
    assert {read_only[cid] for cid in set(read_only) - following} == set()
    shown = {components[t[0]]["props"]["elem_id"] for dep in page_config["dependencies"]
             if "box.scrollHeight" in (dep.get("js") or "") for t in dep["targets"] if t[1] == "select"}
    assert {"tab-quantize", "tab-compare"} <= shown


def test_the_script_targets_the_given_boxes():
    js = follow_newest_js("#quant-log textarea")
    assert "querySelectorAll('#quant-log textarea')" in js
