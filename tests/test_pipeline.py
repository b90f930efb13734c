"""End to end: `dvc repro` of the whole pipeline on a tiny config, in a fresh copy of the repository."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import make_repo, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """One tiny `dvc repro` shared by the tests below."""
    tmp = tmp_path_factory.mktemp("pipeline")
    dest = make_repo(tmp / "repo")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    first = run(["dvc", "repro"], dest, env=env)
    return dest, env, first


def test_repro_leaves_samples_figures_and_metrics(repro):
    dest, _, first = repro
    for stage in ("prepare", "train_classifier", "train", "generate", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    params = yaml.safe_load((dest / "params.yaml").read_text())
    samples = np.load(dest / "samples" / "samples.npy")
    assert samples.dtype == np.float32
    assert samples.shape == (params["generate"]["n_samples"], 1, 32, 32)
    assert samples.min() >= -1 and samples.max() <= 1
    for figure in ("samples/samples.png", "samples/chain.png", "plots/energy_hist.png", "plots/train_curves.png"):
        assert (dest / figure).stat().st_size > 1000, figure
    metrics = json.loads((dest / "metrics" / "evaluate.json").read_text())
    for key in (
        "score_real", "score_noise", "score_samples", "score_gap_real_noise", "auc_real_vs_noise",
        "fid", "fid_real_floor", "confident_share", "coverage_entropy",
    ):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["auc_real_vs_noise"] <= 1 and 0 <= metrics["coverage_entropy"] <= 1
    summary = json.loads((dest / "data" / "prepared" / "summary.json").read_text())
    assert summary["splits"]["train"]["count"] == params["data"]["limit"]
    rows = (dest / "plots" / "train.csv").read_text().strip().splitlines()
    steps = params["train"]["epochs"] * (params["data"]["limit"] // params["train"]["batch_size"])
    every = params["train"]["log_every"]
    assert every > 1 and steps % every, "the tiny config must log every few steps, and the last one apart"
    # a row every log_every steps, and one for the last step: ceil(steps / log_every)
    assert len(rows) == 1 + -(-steps // every)
    logged = [int(float(row.split(",")[0])) for row in rows[1:]]
    assert logged == [*range(every, steps + 1, every), steps]
    shown = run(["dvc", "metrics", "show", "--json"], dest).stdout
    assert "auc_real_vs_noise" in shown


def test_second_repro_does_nothing(repro):
    """...also after a change of runtime.progress_seconds, which changes no output (dvc.yaml leaves it out)."""
    dest, env, _ = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["runtime"]["progress_seconds"] = 5
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = run(["dvc", "repro"], dest, env=env)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout.lower()


def test_evaluate_param_reruns_only_evaluate(repro):
    dest, env, _ = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["evaluate"]["n_noise"] += 6
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], dest, env=env).stdout
    assert "Running stage 'evaluate'" in out
    for stage in ("prepare", "train_classifier", "train", "generate"):
        assert f"Running stage '{stage}'" not in out
