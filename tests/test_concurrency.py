"""Two queued experiments run in parallel and both create, then write, one new SQLite MLflow store.

The whole pipeline queued side by side, through the registry's gate, is tests/test_tracking.py's
``exp_repo``; here the store does not exist yet, so the two trainings race to create it.
"""

import os
import subprocess
import time

import pytest

from tests.conftest import BIN, run

pytestmark = pytest.mark.slow


def queue_logs(repo, names) -> str:
    """What each queued experiment printed (``dvc queue logs <name>``), for a failure message."""
    out = []
    for name in names:
        log = run(["dvc", "queue", "logs", name], repo, check=False)
        out.append(f"\n--- dvc queue logs {name}:\n{log.stdout[-3000:]}{log.stderr[-1000:]}")
    return "".join(out)


def test_two_queued_experiments_share_one_sqlite_store(baseline, tmp_path, new_mlflow_uri):
    """Queued from a reproduced workspace, up to `train`: the data and classifier come from DVC's run-cache,
    and the two trainings open a store that neither finds."""
    import mlflow

    repo_copy = baseline.copy(tmp_path / "repo")

    names = {"0.2": "alpha-02", "0.3": "alpha-03"}
    for alpha, name in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.alpha={alpha}", "train"], repo_copy)
    # The workers `dvc queue start` spawns outlive it and may hold on to its output: not a pipe here,
    # or reading the command's output would wait for the workers to exit.
    start = subprocess.run(
        ["dvc", "queue", "start", "-j", "2"], cwd=repo_copy, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )
    assert start.returncode == 0
    try:
        deadline = time.time() + 420
        while True:
            status = run(["dvc", "queue", "status"], repo_copy).stdout
            if "Queued" not in status and "Running" not in status:
                break
            assert time.time() < deadline, status
            time.sleep(3)
    finally:
        run(["dvc", "queue", "stop"], repo_copy, check=False)  # idle workers would linger after the test
    assert status.count("Success") == 2, status + queue_logs(repo_copy, names.values())

    mlflow.set_tracking_uri(new_mlflow_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 2, runs
    assert sorted(runs["params.train.alpha"]) == ["0.2", "0.3"]
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["metrics.train.train_seconds"].notna().all()  # both runs were written to the end
    shown = run(["dvc", "exp", "show", "--json"], repo_copy).stdout
    assert all(name in shown for name in names.values())
