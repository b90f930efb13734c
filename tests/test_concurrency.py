"""Two queued experiments run in parallel and both create, then write, one new SQLite MLflow store.

The whole pipeline queued side by side, through the registry's gate, is tests/test_tracking.py's
``exp_repo``; here the store does not exist yet, so the two trainings race to create it.
"""

import pytest

from tests.conftest import run, run_queue

pytestmark = pytest.mark.slow


def test_two_queued_experiments_share_one_sqlite_store(baseline, tmp_path, new_mlflow_uri):
    """Queued from a reproduced workspace, up to `train`: the data and classifier come from DVC's run-cache,
    and the two trainings open a store that neither finds."""
    import mlflow

    repo_copy = baseline.copy(tmp_path / "repo")

    names = {"0.2": "alpha-02", "0.3": "alpha-03"}
    for alpha, name in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.alpha={alpha}", "train"], repo_copy)
    status = run_queue(repo_copy, names.values(), timeout=420)
    assert status.count("Success") == 2, status

    mlflow.set_tracking_uri(new_mlflow_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 2, runs
    assert sorted(runs["params.train.alpha"]) == ["0.2", "0.3"]
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["metrics.train.train_seconds"].notna().all()  # both runs were written to the end
    shown = run(["dvc", "exp", "show", "--json"], repo_copy).stdout
    assert all(name in shown for name in names.values())
