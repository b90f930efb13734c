"""Experiment tracking. The only module that imports mlflow.

One MLflow run per trained model: ``train`` starts it and writes its id next to the model;
``generate`` and ``evaluate`` reopen the same run. ``NullTracker`` is the no-op used when
tracking is disabled.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


class TrackingError(RuntimeError):
    """The tracking store cannot be used, worded as one line."""


def project_root(start: str | Path | None = None) -> Path:
    """The repository root that owns the default MLflow store.

    ``dvc exp run --temp`` and queued experiments run in a copy under ``<root>/.dvc/tmp/exps``;
    their runs belong in the root's store, not in the throw-away copy.
    """
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return here


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite file at the repository root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root() / DEFAULT_DB}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 400:
                raise TrackingError(f"tracking: MLflow server {uri} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking: MLflow server {uri} is unreachable ({reason})") from None


def git_tags(root: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    tags = {"git.commit": commit or "unknown"}
    if status is not None:
        tags["git.dirty"] = str(bool(status)).lower()
    return tags


class NullTracker:
    """Tracking switched off: every call is accepted and nothing is recorded."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_model(self, model: Any, input_example: Any) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """A thin wrapper over one MLflow run, through the client API (no global active run)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_model(self, model: Any, input_example: Any) -> None:
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.as_tensor(input_example)).numpy()
        signature = infer_signature(input_example, output)
        # Explicit requirements: inferring them imports and inspects the environment (slow, noisy).
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        with _active_run(self.run_id):
            mlflow.pytorch.log_model(
                model,
                name="energy_model",
                signature=signature,
                input_example=input_example,
                pip_requirements=requirements,
            )

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class _active_run:
    """Temporarily make ``run_id`` the active run for fluent-only MLflow APIs (log_model)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __enter__(self) -> None:
        import mlflow

        mlflow.start_run(run_id=self.run_id)

    def __exit__(self, *exc: object) -> None:
        import mlflow

        # End without changing the run's status: train closes it explicitly at the very end.
        run = mlflow.active_run()
        if run is not None:
            mlflow.end_run(status="RUNNING")


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    check_reachable(uri)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
        artifact_location = (project_root() / DEFAULT_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str] | None = None):
    """A new run in ``cfg.experiment``, or a NullTracker when tracking is disabled."""
    if not cfg.enabled:
        return NullTracker()
    uri = tracking_uri()
    client = _client(uri)
    experiment_id = _experiment_id(client, cfg.experiment, uri)
    all_tags = {**git_tags(project_root()), **(tags or {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return MlflowTracker(client, run.info.run_id)


def resume_run(cfg: TrackingConfig, run_id: str | None):
    """Reopen the run that trained the model (later stages log into it)."""
    if not cfg.enabled or not run_id:
        return NullTracker()
    uri = tracking_uri()
    client = _client(uri)
    try:
        client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"tracking: run {run_id} not found in {uri} ({type(exc).__name__})") from None
    client.update_run(run_id, status="RUNNING")
    return MlflowTracker(client, run_id)


def preflight(cfg: TrackingConfig) -> None:
    """Check the store before any expensive work starts."""
    if cfg.enabled:
        check_reachable(tracking_uri())


def write_run_info(path: str | Path, tracker: Any, experiment: str) -> None:
    info = {"run_id": tracker.run_id, "experiment": experiment if tracker.run_id else None}
    Path(path).write_text(json.dumps(info, indent=2) + "\n")


def read_run_info(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_id")


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="ebm-artifacts-")
