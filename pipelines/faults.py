"""Per-document fault isolation: a document that makes a stage raise is dead-lettered alone.

Every stage after parse runs under Beam's exception handling, never a try/except of its own:
``chunk`` is a ParDo ``with_exception_handling``; ``embed``, ``triples`` and ``amortize`` are
``RunInference`` over a ``StageModel`` (a ModelHandler: its model loads once per worker) with
``with_exception_handling``. A failure becomes ``(doc_id, failure)``; ``drop_failed`` keeps one
failure per document as its dead letter (source coordinates, stage, error class, message) and
drops every other row of that document (doc row, chunks, triples, modulation) before staging,
so the rest of the batch publishes and the memory keeps the document's previous state.

Batches: RunInference batches its input, and a raising batch comes back whole. ``Isolated``
runs the elements of a failed batch again one at a time (a second RunInference with batches
of one), so the failure is pinned on the document that raises and its batch neighbours go on.
Why not batch inside the handler and catch per element: a forward pass fails for the batch as
a whole (a bad tensor, out of memory), so per-element attribution would need a retry anyway;
here it costs nothing until a batch fails, and then one extra pass over that batch.

Failpoints (``Settings.failpoints``, off by default) make a named document raise
``InjectedFault`` inside a stage's real code path; tests and ``bench/chaos.py`` use them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from knowstream.schemas.event import dead_letter

STAGES = ("chunk", "embed", "triples", "amortize")  # in pipeline order: a letter names the first


class InjectedFault(RuntimeError):
    """Raised by a failpoint (``Settings.failpoints``): a fault on purpose."""


def failpoint(stage: str, doc_ids: Iterable[str], fail: frozenset[str]) -> None:
    """Raise ``InjectedFault`` if one of ``doc_ids`` is set to fail in ``stage``."""
    for doc_id in doc_ids:
        if doc_id in fail:
            raise InjectedFault(f"failpoint: {stage} fails for {doc_id}")


def failure(stage: str, doc_id: str, error: tuple) -> tuple[str, dict]:
    """``(doc_id, failure)`` from Beam's exception-handling output ``(type, repr, traceback)``."""
    exc_type, exc_repr, tb = error
    message = exc_repr
    for line in reversed(tb):  # the "module.Class: message" line of the traceback
        head, sep, text = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == exc_type.__name__:
            message = text.strip()
            break
    Metrics.counter(stage, "failed").inc()
    return doc_id, {"stage": stage, "error": exc_type.__name__, "message": message}


class StageModel(ModelHandler):
    """A stage's model for RunInference: loaded once per worker, run on batches of documents.

    Subclasses set ``stage``, implement ``load_model``, ``run_inference`` and ``doc_id`` (the
    document an input element belongs to), and call ``failpoint`` in ``run_inference``.
    """

    stage: str

    def __init__(self, batch_size: int, min_batch_size: int | None = None, fail=()) -> None:
        super().__init__()
        least = min(min_batch_size or batch_size, batch_size)
        self.batch = {"min_batch_size": least, "max_batch_size": batch_size}
        self.fail = frozenset(fail)

    def batch_elements_kwargs(self) -> dict[str, int]:
        return self.batch

    @staticmethod
    def doc_id(element: Any) -> str:
        raise NotImplementedError

    def alone(self) -> StageModel:
        """The same model on batches of one element."""
        single = copy.copy(self)
        single.batch = {"min_batch_size": 1, "max_batch_size": 1}
        return single


class Isolated(beam.PTransform):
    """RunInference of a ``StageModel``: ``(results, failures)``, failures per document."""

    def __init__(self, model: StageModel) -> None:
        super().__init__()
        self.model = model

    def expand(self, pcoll):
        model, stage = self.model, self.model.stage
        results, failed = (
            pcoll
            | "batches" >> RunInference(model, metrics_namespace=stage).with_exception_handling()
        )
        retried, failed_alone = (
            failed.failed_inferences  # (the batch, error)
            | "split failed batches" >> beam.FlatMap(lambda bad: bad[0])
            | "one at a time"
            >> RunInference(model.alone(), metrics_namespace=stage).with_exception_handling()
        )
        failures = failed_alone.failed_inferences | "failures" >> beam.Map(
            lambda bad: failure(stage, model.doc_id(bad[0][0]), bad[1])
        )  # (doc_id, failure)
        return (results, retried) | "results" >> beam.Flatten(), failures


def _first_failure(keyed: tuple[str, Iterable[dict]]) -> tuple[str, dict]:
    doc_id, failures = keyed
    return doc_id, min(failures, key=lambda f: (STAGES.index(f["stage"]), f["message"]))


def _at(row: dict) -> tuple[str, int, int]:
    return row["topic"], row["partition"], row["offset"]


def _letter(keyed: tuple[str, dict], sources: dict[str, dict], messages: dict) -> dict:
    doc_id, f = keyed
    key, value = messages[_at(sources[doc_id])]
    return dead_letter(
        sources[doc_id],
        stage=f["stage"],
        error=f["error"],
        reason="stage_error",
        detail=f["message"],
        doc_id=doc_id,
        key=key,
        value=value,
    )


def drop_failed(failures, sources, raw, outputs: dict[str, Any]) -> dict[str, Any]:
    """One dead letter per failed document, and ``outputs`` without its rows.

    ``failures``: (doc_id, failure) from every stage; ``sources``: (doc_id, {"topic",
    "partition", "offset"}) of the event the batch processed for each document; ``raw``: the
    batch's records; ``outputs``: name -> rows with a "doc_id". Returns the same names with
    the kept rows, plus "dead_letters".
    """
    failed = (
        failures
        | "failures by doc" >> beam.GroupByKey()
        | "first failure" >> beam.Map(_first_failure)
    )  # (doc_id, failure), one per document
    sources_by_doc = beam.pvalue.AsDict(sources)
    # The failed messages as received, so a dead letter can be replayed on its own: a scan of
    # the batch against the few failed coordinates (a side input), no shuffle of the batch.
    failed_at = failed | "failed sources" >> beam.Map(
        lambda kv, src: (_at(src[kv[0]]), 1), sources_by_doc
    )
    messages = (
        raw
        | "failed messages"
        >> beam.Filter(lambda r, at: _at(r) in at, beam.pvalue.AsDict(failed_at))
        | "by source" >> beam.Map(lambda r: (_at(r), (r["key"], r["value"])))
    )
    letters = failed | "stage dead letters" >> beam.Map(
        _letter, sources_by_doc, beam.pvalue.AsDict(messages)
    )
    failed_ids = beam.pvalue.AsDict(failed)
    kept = {
        name: rows
        | f"drop failed {name}"
        >> beam.Filter(lambda row, failed: row["doc_id"] not in failed, failed_ids)
        for name, rows in outputs.items()
    }
    return {**kept, "dead_letters": letters}
