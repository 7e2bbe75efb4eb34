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


def test_a_busy_port_is_refused_before_the_model_loads(tmp_path, models_dir):
    """A second server on a taken port says so at once, instead of after loading its model."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, GPTQ_WEBUI_DATA=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "webui", "--models-dir", str(models_dir),
                               "--model", "SmolLM2-135M-Instruct", "--port", str(port)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert (f"cannot serve on port {port}: another program (another gptq-webui?) is listening there. "
            "Pick another with --port.") in done.stderr
    assert "loading" not in done.stdout                                   # no model load was started


def test_port_problem_names_the_reason():
    import socket
    from webui.app import port_problem
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert "listening there" in port_problem("127.0.0.1", taken.getsockname()[1])
    with socket.socket() as spare:                                        # a port just given back is free
        spare.bind(("127.0.0.1", 0))
        free = spare.getsockname()[1]
    assert port_problem("127.0.0.1", free) is None
