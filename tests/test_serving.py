"""The HTTP API on a real memory: versions, following live, auth, metrics, generation."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from knowstream.connectors.kafka import produce_file
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.ingest import ingest_flow
from knowstream.memory import Memory
from knowstream.models.inference import load_amortizer
from knowstream.models.mac import MAC, MACConfig
from knowstream.models.rerank import best_documents
from knowstream.serving.app import create_app
from knowstream.serving.generate import Bank, Generator, amortizer_for, answer, retrieve
from tests.test_memory_e2e import UPDATE, fresh, sample_events, write_jsonl

QUESTION = "What was the final score of Super Bowl 50?"


@pytest.fixture(scope="module")
def served_settings(broker, tmp_path_factory):
    """A memory with versions 1 and 2, built with the default (bundled) amortizer."""
    tmp = tmp_path_factory.mktemp("serving")
    settings = fresh(broker, tmp).model_copy(update={"api_token": SecretStr("s3cret")})
    produce_file(settings, write_jsonl(tmp / "a.jsonl", sample_events(5)))
    ingest_flow(settings, once=True)
    produce_file(settings, write_jsonl(tmp / "b.jsonl", [UPDATE]))
    ingest_flow(settings, once=True)
    return settings


@pytest.fixture(scope="module")
def served(served_settings):
    with TestClient(create_app(served_settings, poll_s=0.2)) as client:
        client.headers["Authorization"] = "Bearer s3cret"
        yield client
    close_clients()


def test_ask_serves_live_and_pinned_versions(served):
    live = served.post("/ask", json={"question": QUESTION, "k": 2}).json()
    assert live["version"] == 2 and live["answer"] is None
    assert any("27–23" in e["text"] for e in live["evidence"])
    old = served.post("/ask", json={"question": QUESTION, "k": 2, "version": 1}).json()
    assert old["version"] == 1 and any("24–10" in e["text"] for e in old["evidence"])
    assert served.post("/ask", json={"question": QUESTION, "version": 99}).status_code == 404
    assert served.post("/ask", json={"question": ""}).status_code == 422


def test_follows_live_after_admin_rollback(served):
    assert served.post("/admin/live", json={"version": 1}).json() == {"live": 1}
    try:
        assert served.post("/ask", json={"question": QUESTION}).json()["version"] == 1
    finally:
        served.post("/admin/live", json={"version": 2})
    health = served.get("/healthz").json()
    assert (health["status"], health["live"]) == ("ok", 2)
    assert health["ingest"]["state"] == "stopped"  # the worker's record, same home
    unknown = served.post("/admin/live", json={"version": 42})
    assert unknown.status_code == 404 and "42 does not exist" in unknown.json()["detail"]


def test_auth_snapshots_and_metrics(served):
    assert (
        served.post("/ask", json={"question": QUESTION}, headers={"Authorization": ""}).status_code
        == 401
    )
    wrong = {"Authorization": "Bearer nope"}
    assert served.post("/admin/live", json={"version": 1}, headers=wrong).status_code == 401
    rows = served.get("/snapshots").json()
    assert [r["version"] for r in rows] == [1, 2]
    text = served.get("/metrics").text
    assert (
        "knowstream_live_version 2.0" in text
        and 'knowstream_http_requests_total{method="POST",route="/ask",status="401"}' in text
    )
    assert "/ask" in served.get("/openapi.json").json()["paths"]


BIG = 2**63  # one past SQLite's INTEGER: the registry lookup raised OverflowError (a 500)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/ask", {"question": QUESTION, "version": BIG}),
        ("/ask", {"question": QUESTION, "version": -BIG - 1}),
        ("/ask", {"question": QUESTION, "version": 0}),
        ("/admin/live", {"version": BIG}),
        ("/admin/live", {"version": -1}),
        ("/ask", {"question": " \t\n "}),  # was 200 with arbitrary evidence
        ("/ask", {"question": "Who won \ud800?"}),  # lone surrogate: was a 500
        ("/ask", {"question": QUESTION, "mode": "\udfff" * 1000}),
        ("/ask", {"question": "x" * 1_000_000}),  # its 422 echoed the whole megabyte
        ("/ask", {"question": QUESTION, "k": BIG}),
    ],
)
def test_bad_input_is_a_short_422(served, path, body):
    # json.dumps escapes the surrogates (\ud800), as a client would send them.
    response = served.post(
        path, content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert len(response.content) < 1000
    [error] = response.json()["detail"]
    assert error["loc"][0] == "body" and error["msg"]


def test_largest_version_numbers_are_looked_up_not_overflowed(served):
    biggest = {"question": QUESTION, "version": BIG - 1}
    assert served.post("/ask", json=biggest).status_code == 404
    assert served.post("/admin/live", json={"version": BIG - 1}).status_code == 404
    assert served.get("/healthz").json()["live"] == 2


@pytest.mark.parametrize("mode", ["rag", "mac", "mac+rag"])
def test_generation_modes_answer_from_the_frozen_lm(served, mode):
    body = served.post("/ask", json={"question": QUESTION, "k": 2, "mode": mode}).json()
    assert body["mode"] == mode and isinstance(body["answer"], str) and body["answer"]


def test_mac_answers_with_the_amortizer_that_built_the_version(served, served_settings, tmp_path):
    # The version's manifest names the amortizer (weights hash) that built its entries;
    # serving MAC with other networks would aggregate entries they cannot read.
    memory = Memory(served_settings)
    assert amortizer_for(memory, 2) == "bundled"
    other = tmp_path / "other-amortizer"
    MAC.init(MACConfig(seed=7)).save(other)
    elsewhere = Memory(served_settings.model_copy(update={"amortizer": str(other)}))
    with pytest.raises(LookupError, match="amortized by mac-"):
        amortizer_for(elsewhere, 2)


def test_a_version_gives_back_each_document_text_stitched_from_its_chunks(served, served_settings):
    view = Memory(served_settings).view(2)
    texts = {e["doc_id"]: e["text"].strip() for e in sample_events(5)}
    texts[UPDATE["doc_id"]] = UPDATE["text"]
    assert view.texts(list(texts)) == texts
    assert any(len(view.chunks(d)) > 1 for d in texts)  # overlapping chunks among them


def test_mac_banks_only_the_document_the_lm_finds_the_question_likeliest_after(
    served, served_settings
):
    memory = Memory(served_settings)
    result, bank = retrieve(memory, QUESTION, version=2, k=4, mode="mac")
    assert bank is not None and len(bank.doc_ids) > 1
    assert load_amortizer("bundled").config.bank_select == "lm"
    documents = memory.view(2).texts(bank.doc_ids)
    gen = Generator.get()
    best = best_documents(gen.lm, gen.tokenizer, [QUESTION], [bank.doc_ids], documents)[0]
    alone = Bank([best], bank.entries[[bank.doc_ids.index(best)]])
    assert answer(memory, result, bank, "mac") == gen.answer(QUESTION, "mac", [], alone, "bundled")
    with pytest.raises(ValueError, match="needs the documents"):
        gen.answer(QUESTION, "mac", [], bank, "bundled")
