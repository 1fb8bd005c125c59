"""``knowstream report``: one self-contained HTML page about the memory over time.

    knowstream report            # -> <home>/reports/report-<time>.html (and report.html)

Plots are matplotlib SVG inlined in the page, so it opens offline and can be mailed:

- the version timeline: each version at its creation time, lines to its parent,
  backfill side lines, abandoned versions, and where ``live`` pointed over time
  (rollbacks marked);
- documents, chunks and triples per version;
- ingest throughput and consumer lag per batch (``<home>/history/batches.jsonl``);
- dead letters by reason;
- the latest evaluation (an ``eval`` result JSON): table and F1 chart.

``serve`` shows the same page at ``/report``.
"""

from __future__ import annotations

import html
import io
import json
from datetime import UTC, datetime
from pathlib import Path

from knowstream import logs
from knowstream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Where eval results are found when none is named: saved by `knowstream eval`, then the repo's.
EVAL_GLOBS = ("eval/*.json",)
REPO_EVAL_GLOBS = ("models/runs/*/eval.json", "models/checkpoints/*/eval.json")
COLORS = {"ingest": "#1f77b4", "backfill": "#ff7f0e", "live": "#2ca02c", "rollback": "#d62728"}


def _time(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline SVG


def _figure(width: float = 7.5, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


# --- data ----------------------------------------------------------------------------
def versions_of(registry) -> list[dict]:
    rows = []
    for v in registry.versions():
        rows.append(
            {
                "version": v.version,
                "parent": v.parent,
                "kind": v.kind,
                "state": v.state,
                "created": _time(v.created_at) if v.created_at else None,
                "counts": json.loads(v.tags.get("counts", "{}")),
                "live_at": [_time(t) for t in v.tags.get("live_at", "").split(",") if t],
            }
        )
    return rows


def live_moves(versions: list[dict]) -> list[tuple[datetime, int, bool]]:
    """(when, version, is_rollback) for each move of ``live``, oldest first; a move to a
    lower version than the one live before is a rollback."""
    moves = sorted((t, v["version"]) for v in versions for t in v["live_at"])
    out, previous = [], None
    for when, version in moves:
        out.append((when, version, previous is not None and version < previous))
        previous = version
    return out


def batches_of(settings: Settings) -> list[dict]:
    path = logs.history_file(settings)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return rows


def latest_eval(settings: Settings, path: Path | None = None) -> tuple[Path, dict] | None:
    """The named eval JSON, else the newest readable one saved under ``<home>/eval``, else
    the newest readable one of the repository's runs."""
    if path is not None:
        data = _eval_result(path)
        return (path, data) if data else None
    for paths in (
        [p for g in EVAL_GLOBS for p in settings.home.glob(g)],
        [p for g in REPO_EVAL_GLOBS for p in ROOT.glob(g)],
    ):
        for p in sorted(paths, key=lambda p: (p.stat().st_mtime, str(p)), reverse=True):
            if data := _eval_result(p):
                return p, data
    return None


def _eval_result(path: Path) -> dict | None:
    """An eval result with EM and F1 in every row, else None (other JSON, a cut file)."""
    try:
        data = json.loads(path.read_text())
        rows = data["rows"]
        return data if rows and all("em" in r and "f1" in r for r in rows.values()) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --- plots ---------------------------------------------------------------------------
def timeline_svg(versions: list[dict], live: int | None) -> str:
    fig, ax = _figure(7.5, 3.4)
    by_version = {v["version"]: v for v in versions if v["created"]}
    for v in by_version.values():
        parent = by_version.get(v["parent"])
        if parent:
            ax.plot(
                [parent["created"], v["created"]],
                [parent["version"], v["version"]],
                color="#999",
                lw=1,
                zorder=1,
            )
    for kind in ("ingest", "backfill"):
        shown = [v for v in by_version.values() if v["kind"] == kind and v["state"] == "published"]
        if not shown:
            continue
        ax.scatter(
            [v["created"] for v in shown],
            [v["version"] for v in shown],
            color=COLORS[kind],
            label=kind if kind == "ingest" else "backfill (side line)",
            zorder=3,
        )
    dropped = [v for v in by_version.values() if v["state"] != "published"]
    if dropped:
        ax.scatter(
            [v["created"] for v in dropped],
            [v["version"] for v in dropped],
            marker="x",
            color="#777",
            label="abandoned",
            zorder=3,
        )
    moves = live_moves(versions)
    if moves:
        times = [t for t, _, _ in moves] + [datetime.now(UTC)]
        ax.step(
            times,
            [v for _, v, _ in moves] + [moves[-1][1]],
            where="post",
            color=COLORS["live"],
            lw=2,
            alpha=0.6,
            label="live",
            zorder=2,
        )
        back = [(t, v) for t, v, rollback in moves if rollback]
        if back:
            ax.scatter(
                [t for t, _ in back],
                [v for _, v in back],
                marker="v",
                s=90,
                color=COLORS["rollback"],
                label="rollback",
                zorder=4,
            )
    if live in by_version:
        v = by_version[live]
        ax.scatter(
            [v["created"]], [live], s=260, facecolors="none", edgecolors=COLORS["live"], lw=2
        )
        ax.annotate(
            f"live: v{live}", (v["created"], live), xytext=(8, 8), textcoords="offset points"
        )
    ax.set_ylabel("version")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _svg(fig)


def counts_svg(versions: list[dict]) -> str:
    shown = [v for v in versions if v["state"] == "published"]
    fig, ax = _figure()
    width = 0.27
    xs = range(len(shown))
    for i, key in enumerate(("docs", "chunks", "triples")):
        ax.bar(
            [x + (i - 1) * width for x in xs],
            [v["counts"].get(key, 0) for v in shown],
            width,
            label=key,
        )
    ax.set_xticks(list(xs), [f"v{v['version']}" for v in shown])
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def throughput_svg(batches: list[dict]) -> str:
    fig, ax = _figure()
    times = [_time(b["at"]) for b in batches]
    rates = [
        b["messages"] / b["durations"]["batch"] if b["durations"].get("batch") else 0.0
        for b in batches
    ]
    ax.plot(times, rates, marker="o", color=COLORS["ingest"], label="records/s")
    ax.set_ylabel("records per second", color=COLORS["ingest"])
    lag = ax.twinx()
    lag.plot(
        times,
        [b["lag"] if b["lag"] is not None else float("nan") for b in batches],
        marker="s",
        color=COLORS["rollback"],
        label="lag after batch",
    )
    lag.set_ylabel("consumer lag (records)", color=COLORS["rollback"])
    lag.set_ylim(bottom=0, top=max([1, *(b["lag"] or 0 for b in batches)]) * 1.1)
    ax.set_ylim(bottom=0)
    fig.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _svg(fig)


def dead_letters_svg(by_reason: dict[str, int]) -> str:
    fig, ax = _figure(7.5, 0.6 + 0.4 * len(by_reason))
    reasons = sorted(by_reason, key=lambda r: by_reason[r])
    ax.barh(reasons, [by_reason[r] for r in reasons], color=COLORS["rollback"])
    ax.set_xlabel("records")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _svg(fig)


def eval_svg(rows: dict) -> str:
    fig, ax = _figure(7.5, 0.8 + 0.35 * len(rows))
    modes = list(rows)
    f1 = [rows[m]["f1"] for m in modes]
    errors = [
        [f - rows[m].get("f1_ci", [f, f])[0] for m, f in zip(modes, f1, strict=True)],
        [rows[m].get("f1_ci", [f, f])[1] - f for m, f in zip(modes, f1, strict=True)],
    ]
    ax.barh(modes, f1, xerr=errors, color=COLORS["ingest"], capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("F1 (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


# --- page ----------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:980px;color:#222}
h1{margin-bottom:0} .sub{color:#666;margin-top:4px}
section{margin:28px 0} h2{border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f4} .plot svg{max-width:100%;height:auto} .none{color:#888}
.cards{display:flex;gap:16px} .card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:22px}
"""


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(title: str, plot: str | None, extra: str = "", empty: str = "") -> str:
    inner = f'<div class="plot">{plot}</div>{extra}' if plot else f'<p class="none">{empty}</p>'
    return f"<section><h2>{html.escape(title)}</h2>{inner}</section>"


def render(settings: Settings, registry, *, eval_path: Path | None = None) -> str:
    """The page, from the MLflow registry, the batch history and the latest eval."""
    versions = versions_of(registry)
    live = registry.live()
    batches = batches_of(settings)
    by_reason: dict[str, int] = {}
    for b in batches:
        for reason, n in b["dead_letters"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    published = [v for v in versions if v["state"] == "published"]
    live_row = next((v for v in versions if v["version"] == live), None)
    cards = [
        ("live version", f"v{live}" if live else "none"),
        ("published versions", len(published)),
        ("rollbacks", sum(r for _, _, r in live_moves(versions))),
        ("documents live", live_row["counts"].get("docs", 0) if live_row else 0),
        ("batches", len(batches)),
        ("dead letters", sum(by_reason.values())),
    ]
    parts = [
        "<h1>knowstream report</h1>",
        f'<p class="sub">{html.escape(str(settings.home.resolve()))} · generated '
        f"{datetime.now(UTC).isoformat(timespec='seconds')}</p>",
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{html.escape(str(v))}</b>{k}</div>' for k, v in cards)
        + "</div>",
        _section(
            "Version timeline",
            timeline_svg(versions, live) if versions else None,
            _table(
                ["version", "parent", "kind", "state", "created", "docs", "chunks", "triples"],
                [
                    [
                        f"v{v['version']}" + (" (live)" if v["version"] == live else ""),
                        v["parent"] or "",
                        v["kind"],
                        v["state"],
                        v["created"].strftime("%Y-%m-%d %H:%M:%S") if v["created"] else "",
                        *(v["counts"].get(k, "") for k in ("docs", "chunks", "triples")),
                    ]
                    for v in versions
                ],
            ),
            "no versions yet",
        ),
        _section(
            "Documents, chunks and triples per version",
            counts_svg(versions) if published else None,
            empty="no published versions yet",
        ),
        _section(
            "Ingest throughput and lag",
            throughput_svg(batches) if batches else None,
            empty="no batches recorded under this home yet",
        ),
        _section(
            "Dead letters by reason",
            dead_letters_svg(by_reason) if by_reason else None,
            empty="no dead letters",
        ),
    ]
    found = latest_eval(settings, eval_path)
    if found:
        path, result = found
        rows = result["rows"]
        table = _table(
            ["mode", "n", "EM", "EM 95% CI", "F1", "F1 95% CI"],
            [
                [
                    mode,
                    r.get("n", ""),
                    f"{r['em']:.2f}",
                    "[{:.2f}, {:.2f}]".format(*r.get("em_ci", [r["em"], r["em"]])),
                    f"{r['f1']:.2f}",
                    "[{:.2f}, {:.2f}]".format(*r.get("f1_ci", [r["f1"], r["f1"]])),
                ]
                for mode, r in rows.items()
            ],
        )
        title = f"Evaluation: {path.parent.name}/{path.name}"
        note = (
            f"<p>{html.escape(str(result.get('split', '')))} split, {result.get('n', '?')} "
            f"questions, {result.get('n_articles', '?')} articles</p>"
        )
        parts.append(_section(title, eval_svg(rows), note + table))
    else:
        parts.append(_section("Evaluation", None, empty="no evaluation result found"))
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>knowstream report</title><style>{CSS}</style></head><body>{body}</body></html>"
    )


def write(settings: Settings, registry, *, eval_path: Path | None = None) -> Path:
    """Write the page to ``<home>/reports/report-<time>.html`` and ``report.html``."""
    page = render(settings, registry, eval_path=eval_path)
    folder = settings.home / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"report-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}.html"
    path.write_text(page, encoding="utf-8")
    (folder / "report.html").write_text(page, encoding="utf-8")
    return path
