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

What the UI shows: the experiment is a model-training experiment (``mlflow.experimentKind``),
each run carries MLflow's own source tags (Source and Version columns) and a description
(``mlflow.note.content``, from pipeline/provenance.py), the prepared data as dataset inputs
whose digest is the DVC md5, and image grids logged with a key and a step (a step slider).
Model registry: ``register_model`` logs the served scoring model (pipeline/serving.py) into the
run, registers it as one version per trained model, and moves the aliases ``champion`` and
``challenger`` as the quality gate (pipeline/gate.py) decides. A registry failure is one line
(``RegistryError``) and fails the register stage, so that DVC runs it again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import gate
from pipeline.config import RegistryConfig, TrackingConfig
from pipeline.provenance import git

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MODEL_NAME = "energy_model"
# The experiment tag the MLflow UI reads for an experiment's type (its own type selector writes it):
# "custom_model_development" is "Machine learning", whose experiment page is the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
LATER_PARAMS = "- **Later stages ran with other params:** "
# The MLflow 3 UI has a global GenAI / Model-training switch that decides which page an experiment
# opens on; this URL parameter selects "Model training" (the UI then remembers it).
UI_WORKFLOW_QUERY = "workflowType=machine_learning"


class TrackingError(RuntimeError):
    """The tracking store cannot be used, worded as one line."""


class RegistryError(TrackingError):
    """Registering or gating a model failed; one line."""


def one_line(exc: BaseException) -> str:
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
    Also as MLflow's own tags: the UI's Version column is ``mlflow.source.git.commit``.
    """
    commit = git(where, "rev-parse", "HEAD")
    excluded = [f":(exclude){p}" for p in ("dvc.lock", *generated)]
    status = git(where, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    tags = {"git.commit": commit or "unknown"}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if status is not None:
        tags["git.dirty"] = tags["mlflow.source.git.dirty"] = str(bool(status)).lower()
    branch = git(where, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":  # not on a detached HEAD (dvc exp run --temp)
        tags["mlflow.source.git.branch"] = branch
    remote = _without_credentials(git(where, "config", "--get", "remote.origin.url"))
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    return tags


def _without_credentials(url: str | None) -> str | None:
    """A remote URL without a user or token (``https://user:token@host/x`` -> ``https://host/x``)."""
    if not url or "://" not in url:
        return url  # None, or scp-like git@host:path, which holds no secret
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def source_tags(stage: str, root: Path | None = None) -> dict[str, str]:
    """MLflow's own source tags: the UI's Source column shows ``<project>:<entry point>``.

    The project is the repository (its origin URL when it has one, else its folder, of which
    the UI shows the last component); the entry point is the DVC stage that opened the run.
    """
    import getpass

    root = root or project_root()
    tags = {
        "mlflow.source.type": "PROJECT",
        "mlflow.source.name": _without_credentials(git(root, "config", "--get", "remote.origin.url")) or str(root),
        "mlflow.project.entryPoint": stage,
    }
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name, e.g. a container user without a passwd entry
        pass
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
    def tags(self) -> dict[str, str]:
        return {}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_image(self, image: Any, key: str, step: int) -> None: ...
    def log_dataset(self, **kwargs: Any) -> None: ...
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
                f"tracking: {method.__name__} failed on {self.uri} ({one_line(exc)}); "
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

    def tags(self) -> dict[str, str]:
        """The run's tags as they are now ({} when the store fails: one warning line)."""
        return self._tags() or {}

    @_guarded
    def _tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    @_guarded
    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image in a series ``key`` at training step ``step``: the UI steps through the series and
        puts runs side by side in the compare view. ``image``: (H, W) floats in [0, 1] or uint8."""
        self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

    @_guarded
    def log_dataset(
        self, name: str, digest: str, source: str | Path, features: Any, targets: Any, context: str
    ) -> None:
        """A dataset input of the run (the UI's Dataset column): ``name`` with ``digest`` (DVC's md5 of
        ``source``), its schema and profile computed from ``features`` and ``targets``."""
        import mlflow
        import mlflow.data
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = mlflow.data.from_numpy(
            features,
            targets=targets,
            source=LocalArtifactDatasetSource(str(Path(source).resolve())),
            name=name,
            digest=digest,
        )
        with active_run(self.run_id, self.uri):
            mlflow.log_input(dataset, context=context)

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
        with active_run(self.run_id, self.uri):
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
                print(f"tracking: the MLflow model was not logged ({one_line(exc)})", file=sys.stderr)

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
def active_run(run_id: str, uri: str) -> Iterator[None]:
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
        raise TrackingError(f"tracking: cannot use the MLflow store {uri} ({one_line(exc)})") from None
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


def store_client(uri: str | None = None) -> Any:
    """An MlflowClient on ``uri`` (default: ``tracking_uri()``); a store that cannot be used is a TrackingError."""
    return _client(uri or tracking_uri())


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if needed, and kept a model-training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location(uri, name),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        except Exception:  # noqa: BLE001 - another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:  # an older store, or the UI's GenAI default
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def ui_url(base: str, experiment: str, uri: str | None = None) -> str:
    """The MLflow UI's page of ``experiment``'s runs, in the Model-training view (not GenAI's overview).

    Without the experiment in the store (nothing trained yet), the list of experiments.
    """
    base = base.rstrip("/")
    try:
        found = _client(uri or tracking_uri()).get_experiment_by_name(experiment)
    except TrackingError:
        found = None
    if found is None:
        return f"{base}/#/experiments?{UI_WORKFLOW_QUERY}"
    return f"{base}/#/experiments/{found.experiment_id}/runs?{UI_WORKFLOW_QUERY}"


def start_run(
    cfg: TrackingConfig,
    run_name: str,
    tags: dict[str, str] | None = None,
    generated: tuple[str, ...] = (),
    stage: str = "train",
    description: str | None = None,
):
    """A new run in ``cfg.experiment``, or a NullTracker when tracking is disabled.

    Inside ``dvc exp run`` the run is named after the DVC experiment. ``generated`` lists the
    pipeline's output paths, whose changes do not count towards ``git.dirty``. ``stage`` is the
    run's entry point (the UI's Source column), ``description`` its note (markdown).
    """
    if not cfg.enabled:
        return NullTracker()
    uri = tracking_uri()
    client = _client(uri)
    exp_tags = dvc_experiment_tags()
    all_tags = {**git_tags(Path.cwd(), generated), **source_tags(stage), **exp_tags, **(tags or {})}
    if description:
        all_tags[NOTE_TAG] = description
    try:
        experiment_id = _experiment_id(client, cfg.experiment, uri)
        run = client.create_run(experiment_id, run_name=exp_tags.get("dvc.exp_name", run_name), tags=all_tags)
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"tracking: cannot start a run in {uri} ({one_line(exc)})") from None
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
            raise TrackingError(f"tracking: cannot reopen run {run_id} in {uri} ({one_line(exc)})") from None
    if params:
        logged = run.data.params
        changed = {
            k: f"{logged[k]} -> {_param_str(v)}"
            for k, v in params.items()
            if k in logged and logged[k] != _param_str(v)
        }
        if changed:
            tags = {f"param_changed.{k}": v for k, v in changed.items()}
            note = run.data.tags.get(NOTE_TAG)
            if note:  # the description says so too (replacing what an earlier stage wrote)
                later = ", ".join(f"`{k}` {v.replace(' -> ', ' → ')}" for k, v in sorted(changed.items()))
                kept = [line for line in note.rstrip().splitlines() if not line.startswith(LATER_PARAMS)]
                tags[NOTE_TAG] = "\n".join([*kept, LATER_PARAMS + later]) + "\n"
            tracker.set_tags(tags)
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
        raise TrackingError(f"tracking: run {run_id} not found in {uri} ({one_line(exc)})") from None


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
        raise TrackingError(f"tracking: {path} is not a run-info file ({one_line(exc)}); run the train stage again") from None
    return info.get("run_id") if isinstance(info, dict) else None


# ------------------------------------------------------------------ model registry

SCORING_MODEL = "scoring_model"  # the served pyfunc, among the run's logged models
SERVING_CODE = Path(__file__).with_name("serving.py")  # its code (MLflow "models from code")
SCORING_ARTIFACT = "energy_model"  # = serving.ARTIFACT_KEY (not imported: importing serving.py sets MLflow's model)
FID_TAG = "fid"  # every version's FID: what a later version is compared with
REGISTERED_MODEL_DESCRIPTION = (
    "Energy-based model of handwritten digits. Input: {\"inputs\": [...]}, images N x 1 x 32 x 32 float32 "
    "in [-1, 1]. Output per image: score s(x) and energy -s(x). Aliases: champion (what is served), "
    "challenger (the latest version that did not pass the FID gate)."
)


@contextlib.contextmanager
def _registry_lock(uri: str) -> Iterator[None]:
    """One registration at a time per SQLite store (``dvc queue start -j 2`` runs stages side by side).

    Without it two new versions could both find no champion and both take the alias. A tracking
    server has no such lock: let one pipeline register at a time there (the nightly deployment's
    concurrency limit is 1).
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    with FileLock(str(db) + ".registry.lock", timeout=600):
        yield


def _scoring_signature() -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from pipeline.model import IMAGE_SHAPE

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("double", "energy")]),
    )


def _scoring_requirements() -> list[str]:
    """Explicit: inferring them imports and inspects the environment (slow, noisy)."""
    import numpy
    import scipy
    import torch
    import yaml

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"scipy=={scipy.__version__}",
        f"pyyaml=={yaml.__version__}",
    ]


def _log_scoring_model(uri: str, run_id: str, name: str, model_path: Path) -> str:
    """Log the scoring pyfunc into the run, register it under ``name``; the new version's number."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np

    from pipeline.model import IMAGE_SHAPE

    with active_run(run_id, uri):
        info = mlflow.pyfunc.log_model(
            name=SCORING_MODEL,
            python_model=str(SERVING_CODE),
            artifacts={SCORING_ARTIFACT: str(model_path)},
            code_paths=[str(SERVING_CODE.parent)],  # the pipeline package: the model loads without an install
            signature=_scoring_signature(),
            input_example=np.zeros((2, *IMAGE_SHAPE), dtype=np.float32),
            pip_requirements=_scoring_requirements(),
            registered_model_name=name,
        )
    if info.registered_model_version is None:
        raise RegistryError(f"register: MLflow did not register a version of {name}")
    return str(info.registered_model_version)


def _champion(client: Any, name: str) -> gate.Champion | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, gate.CHAMPION)
    except MlflowException:  # no such model or no such alias: no champion yet
        return None
    try:
        fid: float | None = float(mv.tags[FID_TAG])
    except (KeyError, ValueError):  # a version registered by hand: the FID its run recorded, if any
        fid = client.get_run(mv.run_id).data.metrics.get("evaluate.fid") if mv.run_id else None
    return gate.Champion(str(mv.version), fid, dict(mv.tags))


def _version_of_run(client: Any, name: str, run_id: str, model_md5: str) -> str | None:
    """The version already registered for this run and model file: the stage re-ran, no new version."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    same = [int(mv.version) for mv in found if mv.tags.get("dvc.model_md5") == model_md5]
    return str(max(same)) if same else None


def register_model(
    cfg: RegistryConfig, run_id: str, model_path: str | Path, fid: float, tags: dict[str, str]
) -> dict[str, Any]:
    """Register the run's model (once per model file), pass it through the gate, move the alias.

    ``tags`` go on the version; ``dvc.model_md5`` is required (it identifies the model file).
    Returns what was decided (the register stage writes it to ``paths.registry_info``).
    Any MLflow failure is a one-line ``RegistryError``.
    """
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    client = _client(uri)
    name = cfg.model_name
    try:
        with _registry_lock(uri):
            version = _version_of_run(client, name, run_id, tags["dvc.model_md5"])
            if version is None:
                version = _log_scoring_model(uri, run_id, name, Path(model_path))
            champion = _champion(client, name)
            decision = gate.decide(version, fid, champion, cfg.fid_margin, tags)
            if decision.promoted:
                client.set_registered_model_alias(name, gate.CHAMPION, version)
                aliases = client.get_model_version(name, version).aliases
                if gate.CHALLENGER in aliases:  # it was the challenger: now it is the champion only
                    client.delete_registered_model_alias(name, gate.CHALLENGER)
            else:
                client.set_registered_model_alias(name, gate.CHALLENGER, version)
            compared = champion if champion is not None and champion.version != version else None
            version_tags = {
                **tags,
                FID_TAG: repr(float(fid)),
                "gate.decision": decision.reason,
                "gate.alias": decision.alias,
                "gate.margin": repr(float(cfg.fid_margin)),
            }
            if compared is not None:  # the champion it was measured against
                version_tags["gate.champion_version"] = compared.version
                version_tags["gate.champion_fid"] = repr(compared.fid) if compared.fid is not None else "unknown"
            else:  # none; a re-run may follow a decision that had one
                stale = client.get_model_version(name, version).tags
                for key in ("gate.champion_version", "gate.champion_fid"):
                    if key in stale:
                        client.delete_model_version_tag(name, version, key)
            for key, value in version_tags.items():
                client.set_model_version_tag(name, version, key, value)
            client.update_model_version(name, version, description=f"{decision.alias}: {decision.reason}")
            if not client.get_registered_model(name).description:
                client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    except (MlflowException, OSError) as exc:
        raise RegistryError(
            f"register: the model registry of {uri} failed ({one_line(exc)}); "
            "the model is not registered (re-run: dvc repro)"
        ) from None
    return {
        "registered": True,
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "alias": decision.alias,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "fid": fid,
        # the champion the version was compared with (None: there was none, or it was this version already)
        "champion_before": {"version": compared.version, "fid": compared.fid} if compared else None,
        "already_champion": champion is not None and champion.version == version,
        "margin": cfg.fid_margin,
        "run_id": run_id,
    }


def champion_version(cfg: RegistryConfig, uri: str | None = None) -> str:
    """The version that has the alias ``champion`` (a one-line TrackingError when there is none)."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :].split("?", 1)[0]).is_file():
        raise TrackingError(f"serve-model: no MLflow store at {uri} (make run trains and registers a model)")
    client = _client(uri)
    try:
        return str(client.get_model_version_by_alias(cfg.model_name, gate.CHAMPION).version)
    except MlflowException:
        raise TrackingError(
            f"serve-model: no version of {cfg.model_name} has the alias {gate.CHAMPION} in {uri} "
            "(the register stage sets it: dvc repro)"
        ) from None
