"""--api-key: every /v1 route needs exactly `Authorization: Bearer <key>`; tricks get a 401."""
from __future__ import annotations

import socket

import httpx
import openai
import pytest

from apitools import API_KEY, MODEL_ID
from webui.api import bearer_matches
from webui.app import parse_args

OK_BODY = b'{"model": "%s", "prompt": "Hi", "max_tokens": 1}' % MODEL_ID.encode()


def test_the_right_key_works_and_a_wrong_one_does_not(api_server):
    assert [m.id for m in api_server.client().models.list().data] == [MODEL_ID]
    with pytest.raises(openai.AuthenticationError) as info:
        api_server.client(key="wrong-key").models.list()
    assert info.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [
    [],                                                                   # no header
    [("Authorization", "Bearer")],
    [("Authorization", API_KEY)],                                         # no scheme
    [("Authorization", f"Basic {API_KEY}")],
    [("Authorization", f"Token {API_KEY}")],
    [("Authorization", f"Bearer  {API_KEY}")],                            # two spaces
    [("Authorization", f"Bearer {API_KEY[:-1]}")],                        # prefix of the key
    [("Authorization", f"Bearer {API_KEY}x")],                            # key plus more
    [("Authorization", f"Bearer {API_KEY},{API_KEY}")],
    [("Authorization", f"Bearer {API_KEY}"), ("Authorization", "Bearer other")],  # two headers
    [("Authorization", "Bearer other"), ("Authorization", f"Bearer {API_KEY}")],
    [("X-API-Key", API_KEY)],
    [("Api-Key", API_KEY)],
    [("Cookie", f"api_key={API_KEY}")],
])
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", OK_BODY),
    ("GET", "/v1/no-such-route", None),            # unknown routes do not leak a 404 before auth
])
def test_missing_or_tricked_keys_get_401(api_server, headers, method, path, body):
    headers = headers + [("Content-Type", "application/json")]
    response = httpx.request(method, api_server.url + path, headers=headers, content=body, timeout=30)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_key_in_the_query_string_is_not_accepted(api_server):
    response = httpx.get(api_server.base_url + "/models", params={"api_key": API_KEY})
    assert response.status_code == 401


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("target", [
    b"/v1/models", b"//v1/models", b"/v1//models", b"/v1/./models", b"/x/../v1/models", b"/v1/%6dodels",
    b"/V1/models", b"/v1/models%00", b"/v1/models?x=1", b"http://127.0.0.1/v1/models",
])
def test_path_tricks_never_reach_the_api_without_a_key(api_server, target):
    reply = raw_request(api_server.port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                         b"Connection: close\r\n\r\n")
    status = int(reply.split(b" ", 2)[1])
    assert status in (400, 401, 404), reply[:300]
    assert MODEL_ID.encode() not in reply


@pytest.mark.parametrize("header", [
    b"Authorization: Bearer " + API_KEY.encode() + b"\xff",          # raw non-ASCII byte
    b"Authorization: Bearer \t",
    b"Authorization: Bearer\t" + API_KEY.encode(),
    b"Authorization: Bearer " + API_KEY.encode() + b"\r\n Bearer other",  # obsolete line folding
    b"Authorization : Bearer " + API_KEY.encode(),                    # space before the colon
])
def test_malformed_header_bytes_are_refused(api_server, header):
    reply = raw_request(api_server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header +
                        b"\r\nConnection: close\r\n\r\n")
    assert int(reply.split(b" ", 2)[1]) in (400, 401), reply[:300]
    assert MODEL_ID.encode() not in reply


def test_scheme_is_case_insensitive_but_the_key_is_not():
    key = b"s3cret-KEY"
    assert bearer_matches(["Bearer s3cret-KEY"], key)
    assert bearer_matches(["bearer s3cret-KEY"], key)
    assert not bearer_matches(["Bearer s3cret-key"], key)
    assert not bearer_matches([], key)
    assert not bearer_matches(["Bearer s3cret-KEY", "Bearer s3cret-KEY"], key)
    assert bearer_matches(["Bearer caf\u00c3\u00a9-key"], "café-key".encode())   # UTF-8 bytes as Latin-1


def test_listen_needs_an_api_key_unless_insecure(capsys, monkeypatch):
    monkeypatch.delenv("GPTQ_WEBUI_API_KEY", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--listen", "--auth", "ann:pw"])
    assert "--listen also serves the OpenAI API under /v1: add --api-key" in capsys.readouterr().err
    assert parse_args(["--listen", "--auth", "ann:pw", "--api-key", "k3y-k3y-k3y"]).api_key == "k3y-k3y-k3y"
    assert parse_args(["--listen", "--insecure"]).api_key is None
    monkeypatch.setenv("GPTQ_WEBUI_API_KEY", "from-the-environment")
    assert parse_args(["--listen", "--auth", "ann:pw"]).api_key == "from-the-environment"
    with pytest.raises(SystemExit):
        parse_args(["--api-key", "short"])
    assert "at least 8 printable characters" in capsys.readouterr().err


def test_websocket_upgrade_does_not_bypass_the_key(api_server):
    reply = raw_request(api_server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert not reply.startswith(b"HTTP/1.1 101"), reply[:300]       # never switched to a websocket
    assert MODEL_ID.encode() not in reply


@pytest.mark.parametrize("host, status", [
    (b"127.0.0.1", 200), (b"localhost", 200), (b"[::1]", 200), (b"LOCALHOST", 200),
    (b"evil.example", 403), (b"127.0.0.1.evil.example", 403), (b"localhost.evil.example", 403),
    (b"192.168.1.20", 403), (b"[::1].evil", 403),
])
def test_dns_rebinding_hosts_are_refused_on_a_local_server(api_server, host, status):
    """A web page whose name was rebound to 127.0.0.1 sends its own name as Host: refused, key or not."""
    reply = raw_request(api_server.port, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b":" +
                        str(api_server.port).encode() + b"\r\nAuthorization: Bearer " + API_KEY.encode() +
                        b"\r\nConnection: close\r\n\r\n")
    assert int(reply.split(b" ", 2)[1]) == status, reply[:300]
    assert (MODEL_ID.encode() in reply) == (status == 200)
    if status == 403:
        assert b"host_not_allowed" in reply


def test_missing_or_repeated_host_is_refused(api_server):
    for head in (b"GET /v1/models HTTP/1.0\r\n", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"):
        reply = raw_request(api_server.port, head + b"Authorization: Bearer " + API_KEY.encode() +
                            b"\r\nConnection: close\r\n\r\n")
        assert int(reply.split(b" ", 2)[1]) in (400, 403) and MODEL_ID.encode() not in reply


def test_a_listening_server_accepts_other_host_names(tmp_path):
    """With --listen the API is meant for other machines: Host is not checked, the key still is."""
    from starlette.testclient import TestClient
    from webui.api import create_api_app
    from webui.context import AppContext

    ctx = AppContext.create(models_dir=tmp_path / "models", data_dir=tmp_path / "data")
    local = TestClient(create_api_app(ctx, API_KEY, local_only=True), base_url="http://gpu-box.lan")
    listening = TestClient(create_api_app(ctx, API_KEY, local_only=False), base_url="http://gpu-box.lan")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert local.get("/models", headers=auth).status_code == 403
    assert listening.get("/models", headers=auth).json() == {"object": "list", "data": []}
    assert listening.get("/models").status_code == 401
