"""Two queued experiments run in parallel and both land in the same SQLite MLflow store."""

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
    """Queued from a reproduced workspace: the unchanged stages come from DVC's run-cache, the store is new."""
    import mlflow

    repo_copy = baseline.copy(tmp_path / "repo")

    names = {"0.2": "alpha-02", "0.3": "alpha-03"}
    for alpha, name in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.alpha={alpha}"], repo_copy)
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
    assert runs["metrics.evaluate.fid"].notna().all()  # generate/evaluate reached the same runs
    shown = run(["dvc", "exp", "show", "--json"], repo_copy).stdout
    assert shown.count("auc_real_vs_noise") >= 2
    # Both models went through the registry's gate one at a time: two versions, one champion.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=new_mlflow_uri)
    versions = client.search_model_versions("name = 'ebm-mnist'")
    assert sorted(mv.run_id for mv in versions) == sorted(runs["run_id"])
    assert sorted(str(mv.version) for mv in versions) == ["1", "2"]
    first = min(versions, key=lambda mv: int(mv.version))
    assert first.tags["gate.alias"] == "champion" and first.tags["gate.decision"].startswith("first version")
    champion = client.get_model_version_by_alias("ebm-mnist", "champion")
    assert champion.tags["gate.alias"] == "champion"
