"""Log a finished MAC training run to MLflow and register the amortizer.

The GPU machine that trains (models/run_gpu.sh) has no MLflow: it writes
``metrics.json`` (config, curves, best step), the best checkpoint and the
evaluation JSONs. This thin Prefect flow logs them here as one MLflow run
(params, the loss curves as step metrics, eval rows, the checkpoint as an
artifact) and registers the checkpoint as a version of ``knowstream-amortizer``
with the alias ``live``:

    .venv/bin/python -m knowstream.flows.train --metrics RUN/metrics.json \
        --checkpoint models/checkpoints/mac-lm-squad --eval RUN/eval.json \
        --eval RUN/validation.json [--mlflow-uri URI] [--no-alias]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import flow, task

from knowstream.settings import Settings

EXPERIMENT = "knowstream-amortizer"
ALIAS = "live"


@task
def log_run(
    settings: Settings, metrics_path: Path, checkpoint: Path | None, evals: list[Path]
) -> dict:
    m = json.loads(metrics_path.read_text())
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        location = None if settings.mlflow_uri else settings.artifact_root.as_uri()
        client.create_experiment(EXPERIMENT, location)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="mac-squad") as run:
        params = {**m["config"], **{f"mac.{k}": v for k, v in m["mac_config"].items()}}
        params.update(n_params=m["n_params"], device=m["device"], steps=m.get("steps"))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for r in m["train"]:
            mlflow.log_metrics({"train_loss": r["loss"], "bank": r["bank"]}, step=r["step"])
        for r in m["val"]:
            mlflow.log_metrics({"val_gold": r["gold"], "val_wrong": r["wrong"]}, step=r["step"])
        if m.get("best"):
            mlflow.log_metrics({"best_val_gold": m["best"]["gold"], "best_step": m["best"]["step"]})
        mlflow.log_artifact(str(metrics_path))
        for path in evals:
            e = json.loads(path.read_text())
            for mode, row in e["rows"].items():
                mlflow.log_metrics({f"{e['split']}.{mode}.f1": row["f1"]})
                mlflow.log_metrics({f"{e['split']}.{mode}.em": row["em"]})
            mlflow.log_artifact(str(path))
        version = None
        if checkpoint is not None:
            mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
            name = settings.amortizer_model
            try:
                client.get_registered_model(name)
            except mlflow.exceptions.MlflowException:
                client.create_registered_model(name)
            mv = client.create_model_version(
                name, f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id
            )
            version = int(mv.version)
        return {"run_id": run.info.run_id, "version": version}


@flow(name="train-register")
def train_register(
    metrics: str,
    checkpoint: str | None = None,
    evals: list[str] | None = None,
    alias: bool = True,
    settings: Settings | None = None,
) -> dict:
    """Log the run; register the checkpoint (if any) and point ``live`` at it."""
    settings = settings or Settings()
    out = log_run(
        settings,
        Path(metrics),
        Path(checkpoint) if checkpoint else None,
        [Path(e) for e in evals or []],
    )
    if alias and out["version"] is not None:
        MlflowClient(settings.tracking_uri).set_registered_model_alias(
            settings.amortizer_model, ALIAS, str(out["version"])
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metrics", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--eval", action="append", default=[])
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--no-alias", action="store_true")
    a = p.parse_args()
    settings = Settings(**({"mlflow_uri": a.mlflow_uri} if a.mlflow_uri else {}))
    print(train_register(a.metrics, a.checkpoint, a.eval, not a.no_alias, settings))


if __name__ == "__main__":
    main()
