"""Experiment tracking. The only module that imports mlflow.

One MLflow run per trained model: ``train`` starts it and writes its id next to the model
(``models/run.json``, a DVC output of ``train``); ``generate`` and ``evaluate`` reopen the same
run and add their metrics and figures. ``NullTracker`` is the no-op used when tracking is off.

Store: ``MLFLOW_TRACKING_URI`` when set; otherwise the SQLite file ``mlflow.db`` at the
repository root. A SQLite store keeps its artifacts beside the database file, in
``mlartifacts/``. Neither is versioned by git or DVC.

Failure policy: a store that cannot be used stops a stage *before* any work, with one line
naming the URI (``preflight``). Once a stage has started, tracking never throws its work
away: an MLflow failure after that prints one warning line and the stage carries on untracked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MODEL_NAME = "energy_model"


class TrackingError(RuntimeError):
    """The tracking store cannot be used, worded as one line."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ------------------------------------------------------------------ where the store is


def project_root(start: str | Path | None = None) -> Path:
    """The repository root that owns the default MLflow store.

    ``dvc exp run --temp`` and queued experiments run in a copy under ``<root>/.dvc/tmp/exps``;
    their runs belong in the root's store, not in the throw-away copy. DVC names the root in
    ``DVC_ROOT`` for every stage it runs.
    """
    if start is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
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


def artifact_root(uri: str) -> Path | None:
    """The artifact folder beside a SQLite store; None for other stores (they have their own).

    ``sqlite:///rel/mlflow.db`` and ``sqlite:////abs/mlflow.db`` -> ``<db folder>/mlartifacts``.
    A tracking server (http) decides for itself (``mlflow server --artifacts-destination``).
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return Path(db).resolve().parent / DEFAULT_ARTIFACTS


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``<artifact root>/<experiment name>``.

    Runs then land in ``mlartifacts/<experiment>/<run id>/artifacts`` and logged models in
    ``mlartifacts/<experiment>/models/<model id>/artifacts``.
    """
    root = artifact_root(uri)
    if root is None:
        return None
    return (root / (re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip(".-") or "experiment")).as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        raise TrackingError(f"tracking: MLflow server {uri} answered HTTP {exc.code} ({exc.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking: MLflow server {uri} is unreachable ({reason})") from None
    if status >= 400:
        raise TrackingError(f"tracking: MLflow server {uri} answered HTTP {status}")


# ------------------------------------------------------------------ tags


def git_tags(where: Path, generated: tuple[str, ...] = ()) -> dict[str, str]:
    """The commit of the code that runs, and whether tracked files differ from it.

    Changes to ``generated`` paths (dvc.lock and the pipeline's own outputs, which a running
    ``dvc repro`` rewrites stage by stage) do not make the tree dirty: only code and params do.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    excluded = [f":(exclude){p}" for p in ("dvc.lock", *generated)]
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    tags = {"git.commit": commit or "unknown"}
    if commit:
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    if status is not None:
        tags["git.dirty"] = str(bool(status)).lower()
    return tags


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment this stage runs in (``dvc exp run`` sets these), if any."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def _param_str(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _numeric_leaves(obj: Any, prefix: str) -> dict[str, float]:
    """Numbers in a metrics JSON as ``prefix.key`` (nested keys joined by dots), as DVC shows them."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numeric_leaves(v, f"{prefix}.{k}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


# ------------------------------------------------------------------ trackers


class NullTracker:
    """Tracking switched off: every call is accepted and nothing is recorded."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_metrics_file(self, path: str | Path, step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_model(self, model: Any, input_example: Any) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def _guarded(method):
    """Once work has started, an MLflow failure is one warning line, never a lost result."""

    @functools.wraps(method)
    def wrapper(self: MlflowTracker, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return method(self, *args, **kwargs)
        except (MlflowException, OSError) as exc:
            self.broken = True
            print(
                f"tracking: {method.__name__} failed on {self.uri} ({_one_line(exc)}); "
                f"run {self.run_id} is incomplete, carrying on without tracking",
                file=sys.stderr,
            )
            return None

    return wrapper


class MlflowTracker:
    """A thin wrapper over one MLflow run, through the client API (no global active run)."""

    def __init__(self, client: Any, run_id: str, uri: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.broken = False

    @_guarded
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_metrics_file(self, path: str | Path, step: int | None = None) -> None:
        """A stage's DVC metrics file: every number as ``<file stem>.<key>``, and the file itself.

        ``metrics/evaluate.json`` {"fid": 3.2} -> metric ``evaluate.fid`` = 3.2, the value
        ``dvc exp show`` lists for the same run.
        """
        path = Path(path)
        if not path.is_file():
            return
        self.log_metrics(_numeric_leaves(json.loads(path.read_text()), path.stem), step=step)
        self.log_artifact(path, "metrics")

    @_guarded
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_guarded
    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    @_guarded
    def log_model(self, model: Any, input_example: Any) -> None:
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.as_tensor(input_example)).numpy()
        signature = infer_signature(input_example, output)
        # Explicit requirements: inferring them imports and inspects the environment (slow, noisy).
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        with _active_run(self.run_id, self.uri):
            try:
                mlflow.pytorch.log_model(
                    model,
                    name=MODEL_NAME,
                    signature=signature,
                    input_example=input_example,
                    pip_requirements=requirements,
                    # torch.export graph: loads without this package's code and without unpickling it
                    serialization_format="pt2",
                )
            except (MlflowException, OSError):
                raise  # the store itself failed: _guarded reports it
            except Exception as exc:  # noqa: BLE001 - e.g. torch.export; the model file is already saved
                print(f"tracking: the MLflow model was not logged ({_one_line(exc)})", file=sys.stderr)

    @_guarded
    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global (fluent) API at ``uri`` for a while, then put everything back.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the process; left set,
    it would redirect every later run of the same process (tests, the Prefect flow).
    """
    import mlflow

    try:
        from mlflow.tracking._tracking_service import utils as _state

        previous = getattr(_state, "_tracking_uri", None)
    except ImportError:  # pragma: no cover - layout of a future MLflow
        previous = None
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextlib.contextmanager
def _active_run(run_id: str, uri: str) -> Iterator[None]:
    """Temporarily make ``run_id`` the active run for fluent-only MLflow APIs (log_model)."""
    import mlflow

    with using_uri(uri):
        mlflow.start_run(run_id=run_id)
        try:
            yield
        finally:
            # End without changing the run's status: the stage closes it explicitly at the very end.
            if mlflow.active_run() is not None:
                mlflow.end_run(status="RUNNING")


# ------------------------------------------------------------------ opening runs


def _client(uri: str) -> Any:
    """A client on ``uri``; any failure to open the store is a one-line TrackingError."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    check_reachable(uri)
    try:
        from mlflow.tracking import MlflowClient

        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # opens (and for SQLite creates) the store
    except Exception as exc:  # noqa: BLE001 - any store problem, one line
        raise TrackingError(f"tracking: cannot use the MLflow store {uri} ({_one_line(exc)})") from None
    return client


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the first opening of a SQLite store across processes.

    Two experiments started together (``dvc queue start -j 2``) would otherwise both run
    MLflow's schema migrations on a new database at once, and one fails with "database is
    locked". Later writes are short transactions that SQLite's own busy timeout handles.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        yield


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:  # noqa: BLE001 - another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(
    cfg: TrackingConfig, run_name: str, tags: dict[str, str] | None = None, generated: tuple[str, ...] = ()
):
    """A new run in ``cfg.experiment``, or a NullTracker when tracking is disabled.

    Inside ``dvc exp run`` the run is named after the DVC experiment. ``generated`` lists the
    pipeline's output paths, whose changes do not count towards ``git.dirty``.
    """
    if not cfg.enabled:
        return NullTracker()
    uri = tracking_uri()
    client = _client(uri)
    exp_tags = dvc_experiment_tags()
    all_tags = {**git_tags(Path.cwd(), generated), **exp_tags, **(tags or {})}
    try:
        experiment_id = _experiment_id(client, cfg.experiment, uri)
        run = client.create_run(experiment_id, run_name=exp_tags.get("dvc.exp_name", run_name), tags=all_tags)
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"tracking: cannot start a run in {uri} ({_one_line(exc)})") from None
    return MlflowTracker(client, run.info.run_id, uri)


def resume_run(cfg: TrackingConfig, run_id: str | None, params: dict[str, Any] | None = None):
    """Reopen the run that trained the model (later stages log into it).

    Stages open it before their work, so a store or run that cannot be used stops them early.
    ``params`` (``Params.flat()``) are compared with the run's: MLflow params cannot change, so
    a value that differs from the one the run was started with is recorded as a tag
    ``param_changed.<key>`` ("old -> new") and reported in one line.
    """
    if not cfg.enabled or not run_id:
        return NullTracker()
    uri = tracking_uri()
    client = _client(uri)
    run = _get_run(client, run_id, uri)
    tracker = MlflowTracker(client, run_id, uri)
    if run.info.status != "FINISHED":  # training resumed after a kill; a finished run stays finished
        try:
            client.update_run(run_id, status="RUNNING")
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(f"tracking: cannot reopen run {run_id} in {uri} ({_one_line(exc)})") from None
    if params:
        logged = run.data.params
        changed = {
            k: f"{logged[k]} -> {_param_str(v)}"
            for k, v in params.items()
            if k in logged and logged[k] != _param_str(v)
        }
        if changed:
            tracker.set_tags({f"param_changed.{k}": v for k, v in changed.items()})
            print(
                f"tracking: run {run_id} was started with other values of {', '.join(sorted(changed))}; "
                "recorded as param_changed.* tags",
                file=sys.stderr,
            )
    return tracker


def preflight(cfg: TrackingConfig, run_id: str | None = None) -> None:
    """Check the store (and the run a later stage will reopen) before any expensive work starts."""
    if not cfg.enabled:
        return
    uri = tracking_uri()
    client = _client(uri)
    if run_id:
        _get_run(client, run_id, uri)


def _get_run(client: Any, run_id: str, uri: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"tracking: run {run_id} not found in {uri} ({_one_line(exc)})") from None


# ------------------------------------------------------------------ run id file


def write_run_info(path: str | Path, tracker: Any, experiment: str) -> None:
    info = {"run_id": tracker.run_id, "experiment": experiment if tracker.run_id else None}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(info, indent=2) + "\n")


def read_run_info(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrackingError(f"tracking: {path} is not a run-info file ({_one_line(exc)}); run the train stage again") from None
    return info.get("run_id") if isinstance(info, dict) else None


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="ebm-artifacts-")
