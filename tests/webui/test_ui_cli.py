"""Command line: safe defaults, --listen refused without --auth."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from webui.app import TABS, parse_args

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_local():
    args = parse_args([])
    assert (args.listen, args.port, args.auth, args.model) == (False, 7860, None, None)


def test_listen_without_auth_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--listen"])
    assert exit_info.value.code == 2
    assert "--listen serves on every network interface: add --auth" in capsys.readouterr().err


def test_listen_with_auth_or_insecure():
    assert parse_args(["--listen", "--auth", "ann:s3cret:x", "--api-key", "k3y-k3y-k3y"]).auth == ("ann", "s3cret:x")
    assert parse_args(["--listen", "--insecure"]).listen


@pytest.mark.parametrize("argv, message", [
    (["--auth", "nopassword"], "user:password"),
    (["--auth", ":pw"], "user:password"),
    (["--port", "70000"], "--port must be"),
    (["--backend", "nonsense"], "unknown backend"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_module_entry_point_refuses_open_listen(tmp_path):
    """`python -m webui --listen` exits at once with the reason, before loading anything."""
    env = dict(os.environ, GPTQ_WEBUI_DATA=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "webui", "--listen"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--auth" in done.stderr


def test_tab_modules_expose_build():
    import importlib
    for name in TABS:
        module = importlib.import_module(name)
        assert callable(module.build) and module.TITLE


def test_unknown_model_at_start_exits_with_the_reason(tmp_path):
    env = dict(os.environ, GPTQ_WEBUI_DATA=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "webui", "--model", "no-such-model", "--port", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "cannot load no-such-model: 'no-such-model': no such model in" in done.stderr
