"""Security basics: loopback by default, bearer auth, doc ids never become paths,
the API token stays secret (not in reprs, not in the server's logs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from knowstream.connectors.kafka import produce_file
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.ingest import ingest_flow
from knowstream.memory import Memory
from knowstream.schemas.event import InvalidEvent, parse_event
from knowstream.serving.app import create_app
from knowstream.settings import Settings
from tests.fixtures_broker import free_port
from tests.test_memory_e2e import fresh, write_jsonl

TOKEN = "tok-3f9a1c7e5b"  # distinctive, so a leak is found by a plain search


# --- the server binds loopback by default, and never logs the token ---------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def _request(url: str, body: bytes | None = None, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_cli_serve_binds_loopback_by_default_and_never_logs_the_token(tmp_path):
    port = free_port()
    env = {**os.environ, "KNOWSTREAM_API_TOKEN": TOKEN, "KNOWSTREAM_HOME": str(tmp_path)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "knowstream"), "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while not _listening_addresses(port):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        # Only 127.0.0.1 (hex, little-endian 0100007F): not 0.0.0.0, not ::.
        assert _listening_addresses(port) == {"0100007F"}
        base = f"http://127.0.0.1:{port}"
        ask = b'{"question": "anything"}'
        assert _request(base + "/healthz") == 200
        assert _request(base + "/ask", ask) == 401
        assert _request(base + "/ask", ask, token=TOKEN + "x") == 401
        assert _request(base + "/ask", ask, token=TOKEN) == 503  # authorized; no memory yet
        assert _request(base + "/admin/live", b'{"version": 1}', token=TOKEN) == 404  # none yet
    finally:
        proc.terminate()
        proc.wait(20)
    text = log.read_text(errors="replace")
    assert "POST /ask" in text  # the access log ran...
    assert TOKEN not in text  # ...and neither the token nor a wrong guess at it leaked


# --- bearer auth on /ask and /admin -------------------------------------------------


@pytest.fixture
def guarded(tmp_path):
    close_clients()
    settings = Settings(home=tmp_path / "home", api_token=SecretStr(TOKEN))
    with TestClient(create_app(settings, poll_s=60)) as client:
        yield client
    close_clients()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x"],
)
@pytest.mark.parametrize(
    "path,body", [("/ask", {"question": "q"}), ("/admin/live", {"version": 1})]
)
def test_ask_and_admin_refuse_missing_or_wrong_tokens(guarded, authorization, path, body):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = guarded.post(path, json=body, headers=headers)
    assert response.status_code == 401
    assert TOKEN not in response.text


def test_right_token_passes_and_open_endpoints_need_none(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.post("/ask", json={"question": "q"}, headers=auth).status_code == 503
    assert (
        guarded.post(
            "/ask", json={"question": "q"}, headers={"authorization": f"bearer {TOKEN}"}
        ).status_code
        == 503
    )
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/metrics").status_code == 200


# --- the token is a secret --------------------------------------------------------


def test_api_token_is_a_secret_in_settings(monkeypatch):
    monkeypatch.setenv("KNOWSTREAM_API_TOKEN", TOKEN)
    settings = Settings()
    assert isinstance(settings.api_token, SecretStr)
    assert settings.api_token.get_secret_value() == TOKEN
    for shown in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
    ):
        assert TOKEN not in shown
    assert TOKEN not in repr(Settings(api_token=TOKEN))


def test_served_requests_do_not_log_the_token(guarded, caplog):
    caplog.set_level("DEBUG")
    guarded.post("/ask", json={"question": "q"}, headers={"Authorization": f"Bearer {TOKEN}"})
    guarded.post("/ask", json={"question": "q"}, headers={"Authorization": f"Bearer {TOKEN}x"})
    assert TOKEN not in caplog.text


# --- doc ids never become file paths ------------------------------------------------


@pytest.mark.parametrize(
    "doc_id",
    ["../../etc/passwd", "..", "a/b", "/etc/passwd", "a\\b", "..\\..\\x", "a\x00b", "x" * 10_000],
)
def test_path_like_doc_ids_are_rejected_by_parse(doc_id):
    import json

    with pytest.raises(InvalidEvent) as raised:
        parse_event(doc_id.encode(), json.dumps({"doc_id": doc_id, "text": "t"}).encode())
    assert raised.value.reason == "bad_doc_id"
    with pytest.raises(InvalidEvent):  # a tombstone keyed by it too
        parse_event(doc_id.encode(), None)


def test_staging_and_artifact_paths_do_not_derive_from_doc_ids(broker, tmp_path):
    """Ingest documents with unusual (valid) ids; no file or folder under the home
    (staging, Qdrant, MLflow artifacts) is named after any of them."""
    settings = fresh(broker, tmp_path)
    ids = ["Weird:Doc*Id?", "spaces in id", "日本語のdoc", "dots.and-dashes_ok"]
    events = [
        {"doc_id": d, "text": f"Document {i} about the river Rhine and its bridges."}
        for i, d in enumerate(ids)
    ]
    produce_file(settings, write_jsonl(tmp_path / "odd.jsonl", events))
    reports = ingest_flow(settings, once=True)
    assert reports[-1].version == 1 and not reports[-1].dead_letters
    memory = Memory(settings)
    assert sorted(memory.view().docs()) == sorted(ids)
    names = [p.name for p in settings.home.rglob("*")]
    assert names, "nothing written?"
    leaked = [n for n in names for d in ids if d in n or d.split(":")[0] in n]
    assert leaked == []
    artifacts = [
        f.path
        for f in memory.registry.client.list_artifacts(memory.registry.get(1).run_id, "snapshot")
    ]
    assert artifacts and all(d not in a for a in artifacts for d in ids)
    close_clients()
