"""Shared fixtures: tiny configurations that run in seconds on 2 CPU cores."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Overrides that make the whole pipeline run in seconds: tens of images, a few Langevin steps.
TINY = {
    "data": {"limit": 64},
    "langevin": {"steps": 3},
    "buffer": {"size": 64},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "log_every": 3,  # > 1 and not a divisor of the 8 steps: the last step is logged on its own
        "sample_every": 6,
        "checkpoint_every": 2,
        "snapshots": 3,  # the weights after steps 4, 6 and 8 of 8: generation splits its chains over them
        "snapshot_every": 2,
    },
    "classifier": {"epochs": 1, "batch_size": 32, "feature_dim": 16},
    "generate": {
        "n_samples": 24, "steps": 6, "final_steps": 2, "batch_size": 12, "chain_rows": 3, "chain_steps": [0, 1, 5],
        "snapshots": 3,
    },
    "evaluate": {"n_noise": 24, "hist_bins": 10},
    "ood": {"n_noise": 24, "hist_bins": 10},
    "restore": {"n_images": 8, "steps": 3, "figure_columns": 4},
}


def tiny_params_dict(overrides: dict | None = None) -> dict:
    """The repository's params.yaml with the TINY overrides (and any extra ones) applied."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for layer in (TINY, overrides or {}):
        for section, values in layer.items():
            raw[section].update(values)
    return raw


def write_params(path: Path, overrides: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(tiny_params_dict(overrides), sort_keys=False))
    return path


_STORE_TEMPLATE: list[Path] = []


def empty_mlflow_store(path: Path) -> Path:
    """An empty MLflow SQLite store at ``path``, copied from one made once per test session.

    A new store runs MLflow's schema migrations, seconds of work that every test with a private
    store would repeat; the copy takes milliseconds. The Default experiment's artifact folder is
    pointed beside the copy. Tests of the store's own creation (the first opening under
    concurrency, a store that must not be created) start without one instead.
    """
    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="mlflow-store-template-"))
        atexit.register(shutil.rmtree, folder, True)
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments(max_results=1)
        _STORE_TEMPLATE.append(folder / "mlflow.db")
    shutil.copyfile(_STORE_TEMPLATE[0], path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   [str(path.parent / "mlruns" / "0")])
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store for one test."""
    uri = f"sqlite:///{empty_mlflow_store(tmp_path / 'mlflow.db')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def new_mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private MLflow store that does not exist yet: the pipeline creates it (or must not)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_params(tmp_path, monkeypatch, mlflow_uri):
    """Validated tiny Params whose outputs all land under a temporary working directory."""
    from pipeline.config import parse_params

    monkeypatch.chdir(tmp_path)
    return parse_params(tiny_params_dict())


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run a command with the virtualenv's tools first on PATH; show its output when it fails."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_queue(repo: Path, names, timeout: float = 900) -> str:
    """`dvc queue start -j 2` on the experiments queued in ``repo``, wait until none is queued or running,
    stop the workers; ``dvc queue status`` at the end, with each experiment's log where one did not succeed."""
    names = list(names)
    # The workers `dvc queue start` spawns outlive it and may hold on to its output: not a pipe here,
    # or reading the command's output would wait for the workers to exit.
    start = subprocess.run(
        ["dvc", "queue", "start", "-j", "2"], cwd=repo, timeout=120,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    assert start.returncode == 0
    try:
        deadline = time.time() + timeout
        while True:
            status = run(["dvc", "queue", "status"], repo).stdout
            if "Queued" not in status and "Running" not in status:
                break
            assert time.time() < deadline, status
            time.sleep(2)
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)  # idle workers would linger after the test
    if status.count("Success") != len(names):
        for name in names:
            log = run(["dvc", "queue", "logs", name], repo, check=False)
            status += f"\n--- dvc queue logs {name}:\n{log.stdout[-3000:]}{log.stderr[-1000:]}"
    return status


def copy_prepared(src: Path, dest: Path, overrides: dict | None = None) -> Path:
    """A new working folder ``dest`` with a tiny params.yaml and the prepared data of ``src``."""
    dest.mkdir()
    write_params(dest / "params.yaml", overrides)
    (dest / "data" / "prepared").mkdir(parents=True)
    for f in (src / "data" / "prepared").iterdir():
        (dest / "data" / "prepared" / f.name).write_bytes(f.read_bytes())
    return dest


GIT = ["git", "-c", "user.email=tests@example.com", "-c", "user.name=tests"]


def make_repo(dest: Path, overrides: dict | None = None, store: bool = True) -> Path:
    """A fresh git + DVC repository at ``dest`` holding the project's tracked files and a tiny params.yaml.

    ``store``: with an empty default MLflow store (``mlflow.db``, git-ignored) already in place.
    """
    for rel in tracked_files():
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    write_params(dest / "params.yaml", overrides)
    run(["git", "init", "-q"], dest)
    # A local identity: `dvc exp run` commits experiments, and a fresh machine may have no global one.
    run(["git", "config", "user.email", "tests@example.com"], dest)
    run(["git", "config", "user.name", "tests"], dest)
    run([*GIT, "add", "-A"], dest)
    run([*GIT, "commit", "-qm", "tiny"], dest)
    if store:
        empty_mlflow_store(dest / "mlflow.db")
    return dest


@pytest.fixture
def repo_copy(tmp_path, mlflow_uri) -> Path:
    return make_repo(tmp_path / "repo")


def copy_repo(src: Path, dest: Path) -> Path:
    """A copy of the repository ``src`` (git, DVC cache, outputs and its default MLflow store) at ``dest``.

    The store records absolute artifact locations; they are rewritten to the copy's, so runs,
    artifacts and registered models of the copy live in the copy.
    """
    shutil.copytree(src, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.is_file():
        old, new = str(src.resolve()), str(dest.resolve())
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                    name, kind = column[1], (column[2] or "").upper()
                    if "CHAR" in kind or "TEXT" in kind or "CLOB" in kind:
                        con.execute(
                            f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE instr("{name}", ?) > 0',
                            (old, new, old),
                        )
    return dest


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A tiny repository after one whole `dvc repro` with the default MLflow store, committed."""

    path: Path
    repro_stdout: str
    rev: str

    def copy(self, dest: Path) -> Path:
        return copy_repo(self.path, dest)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Baseline:
    """One whole tiny `dvc repro`, shared by every test that starts from a repository with outputs.

    Tests work in copies (``baseline.copy(tmp_path / "repo")``) and never in this one. The store
    is the default one (``mlflow.db`` at the repository root), as a user's `make run` leaves it.
    Under pytest-xdist (``make test`` runs two workers) the first worker that needs it builds it
    in the session's shared temporary folder, under a file lock, and the others read it.
    """
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above the workers' own
    record = shared / "baseline.json"
    with FileLock(str(shared / "baseline.lock")):
        if record.is_file():
            saved = json.loads(record.read_text())
            return Baseline(Path(saved["path"]), saved["repro_stdout"], saved["rev"])
        mp = pytest.MonkeyPatch()
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            mp.delenv(var, raising=False)
        try:
            dest = make_repo(Path(tempfile.mkdtemp(prefix="baseline-", dir=shared)) / "repo")
            first = run(["dvc", "repro"], dest)
            run([*GIT, "add", "-A"], dest)
            run([*GIT, "commit", "-qm", "baseline"], dest)
            rev = run(["git", "rev-parse", "HEAD"], dest).stdout.strip()
        finally:
            mp.undo()
        record.write_text(json.dumps({"path": str(dest), "repro_stdout": first.stdout, "rev": rev}))
        return Baseline(dest, first.stdout, rev)
