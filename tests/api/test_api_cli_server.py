"""`python -m webui --api-key ...` as a user starts it: the API is on the page's port and needs the key,
uploads are size-limited and land under the user data folder; Ctrl+C and SIGTERM stop it cleanly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.net import free_port

REPO = Path(__file__).resolve().parents[2]
KEY = "cli-test-key-42f0"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Runs the server with Python's Ctrl+C handler in place: a process started by a non-interactive shell in the
# background (a CI job) inherits SIGINT ignored, and Python then keeps it ignored.
WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "sys.argv[0] = 'webui'; runpy.run_module('webui', run_name='__main__')")
READY = "Press Ctrl+C to stop."


def start_server(data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m webui --model ... --api-key ...` on a free port, its output in `log`; returns once the page
    says it is running (or fails the test with the log's tail)."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("GRADIO_TEMP_DIR", None)
    env.pop("GPTQ_WEBUI_API_KEY", None)
    # the log goes to a file: an unread pipe fills up and blocks the server's shutdown on its last print
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", WITH_CTRL_C, "--model", GGUF, "--port", str(port),
                                 "--api-key", KEY, "--data-dir", str(data)],
                                cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and READY not in log.read_text():
        time.sleep(0.25)
    if READY not in log.read_text():
        proc.kill()
        pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
    return proc, base


def stop_server(proc: subprocess.Popen, how: int) -> tuple[int | None, float]:
    """Send `how`; the exit status and seconds it took (None and the time waited if it had to be killed)."""
    started = time.monotonic()
    proc.send_signal(how)
    try:
        return proc.wait(30), time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None, time.monotonic() - started


@pytest.fixture(scope="module")
def cli_server(default_gguf, tmp_path_factory):
    data = tmp_path_factory.mktemp("cli-data")
    log = tmp_path_factory.mktemp("cli-log") / "server.log"
    proc, base = start_server(data, log)
    yield base, data, proc, log
    if proc.poll() is None:
        stop_server(proc, signal.SIGTERM)


def test_api_needs_the_key_and_serves_the_loaded_model(cli_server):
    base = cli_server[0]
    assert httpx.get(base + "/v1/models").status_code == 401
    models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == [f"{GGUF}@llama.cpp"]
    reply = httpx.post(base + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The password is apple. "
                             "I repeat, the password is", "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200 and "apple" in reply.json()["choices"][0]["text"]
    assert httpx.get(base + "/").status_code == 200              # the page is on the same port


def test_uploads_are_limited_and_stored_under_the_data_folder(cli_server):
    from webui.security import DEFAULT_MAX_UPLOAD_BYTES
    base, data = cli_server[:2]
    small = httpx.post(base + "/gradio_api/upload", files={"files": ("notes.txt", b"some text\n")}, timeout=60)
    assert small.status_code == 200, small.text
    stored = Path(small.json()[0]).resolve()
    assert (data / "uploads").resolve() in stored.parents and stored.read_bytes() == b"some text\n"
    big = httpx.post(base + "/gradio_api/upload", timeout=120,
                     files={"files": ("big.txt", b"x" * (DEFAULT_MAX_UPLOAD_BYTES + 1024))})
    assert big.status_code == 413, big.text[:200]
    assert not [p for p in (data / "uploads").rglob("big.txt")]


def test_upload_names_cannot_leave_the_uploads_folder(cli_server):
    base, data = cli_server[:2]
    for name in ("../../escape.txt", "/tmp/absolute-escape.txt", "..\\..\\win-escape.txt"):
        reply = httpx.post(base + "/gradio_api/upload", files={"files": (name, b"payload\n")}, timeout=60)
        assert reply.status_code == 200, reply.text
        stored = Path(reply.json()[0]).resolve()
        assert (data / "uploads").resolve() in stored.parents, stored
    assert not (data / "escape.txt").exists() and not (data.parent / "escape.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_the_server_is_not_reachable_from_other_interfaces(cli_server):
    """Without --listen it binds 127.0.0.1 only: this machine's other addresses refuse the connection."""
    import psutil
    port = int(cli_server[0].rsplit(":", 1)[1])
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not others:
        pytest.skip("this machine has no network interface besides loopback")
    for address in others:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=5).close()


def test_sigterm_stops_the_server_cleanly(cli_server):
    """SIGTERM (what systemd and `docker stop` send) stops it the way Ctrl+C does: the server closes, the
    models unload, exit status 0, within seconds. Last in this file: it stops the module's server."""
    _, _, proc, log = cli_server
    status, seconds = stop_server(proc, signal.SIGTERM)
    output = log.read_text()
    assert status == 0 and seconds < 15, (status, seconds, output[-1500:])
    assert output.rstrip().endswith("gptq-webui: stopped") and "Traceback" not in output, output[-1500:]


def test_ctrl_c_stops_the_server_cleanly(default_gguf, tmp_path):
    """Ctrl+C (SIGINT, as the page's startup lines say) closes the server and exits with status 0."""
    proc, base = start_server(tmp_path / "data", tmp_path / "server.log")
    assert httpx.get(base + "/v1/models").status_code == 401
    status, seconds = stop_server(proc, signal.SIGINT)
    output = (tmp_path / "server.log").read_text()
    assert status == 0 and seconds < 15, (status, seconds, output[-1500:])
    assert output.rstrip().endswith("gptq-webui: stopped") and "Traceback" not in output, output[-1500:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/v1/models", timeout=2)
