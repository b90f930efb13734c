"""End to end: `dvc repro` of the whole pipeline on a tiny config, in a fresh copy of the repository (tests/conftest.py: baseline)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repro(baseline, tmp_path_factory):
    """A copy of the session's tiny `dvc repro` (its output as `first`), for the tests below to change."""
    dest = baseline.copy(tmp_path_factory.mktemp("pipeline") / "repo")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}  # the copy's own default store
    first = subprocess.CompletedProcess(["dvc", "repro"], 0, stdout=baseline.repro_stdout, stderr="")
    return dest, env, first


def test_repro_leaves_samples_figures_and_metrics(repro):
    dest, _, first = repro
    for stage in ("prepare", "train_classifier", "train", "generate", "evaluate", "ood", "restore"):
        assert f"Running stage '{stage}'" in first.stdout
    params = yaml.safe_load((dest / "params.yaml").read_text())
    samples = np.load(dest / "samples" / "samples.npy")
    assert samples.dtype == np.float32
    assert samples.shape == (params["generate"]["n_samples"], 1, 32, 32)
    assert samples.min() >= -1 and samples.max() <= 1
    figures = ("samples/samples.png", "samples/chain.png", "plots/energy_hist.png", "plots/train_curves.png",
               "plots/ood_scores.png", "plots/ood_cases.png", "plots/restore.png")
    for figure in figures:
        assert (dest / figure).stat().st_size > 1000, figure
    metrics = json.loads((dest / "metrics" / "evaluate.json").read_text())
    for key in (
        "score_real", "score_noise", "score_samples", "score_gap_real_noise", "auc_real_vs_noise",
        "fid", "fid_real_floor", "confident_share", "coverage_entropy",
        "grey_share", "grey_share_real", "fid_real_saturated", "saturation_contrast", "fid_real_mix", "fid_even_mix",
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


def test_repro_scores_ood_cases_restores_digits_and_stores_the_threshold(repro):
    dest, env, _ = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    threshold = json.loads((dest / "models" / "threshold.json").read_text())
    assert threshold["accepted_heldout"] >= params["evaluate"]["accept_share"]
    assert threshold["n_heldout"] == params["data"]["limit"]
    ood = json.loads((dest / "metrics" / "ood.json").read_text())
    for case in params["ood"]["cases"]:
        assert 0 <= ood[f"ood_auc_{case}"] <= 1 and 0 <= ood[f"ood_accepted_{case}"] <= 1, case
        assert f"`{case}`" in (dest / "metrics" / "ood.md").read_text()
    assert ood["ood_accepted_real"] == threshold["accepted_heldout"]
    restore = json.loads((dest / "metrics" / "restore.json").read_text())
    for task in ("inpaint", "denoise"):
        for key in ("acc", "acc_corrupted", "acc_original", "mse", "mse_corrupted"):
            assert np.isfinite(restore[f"restore_{task}_{key}"]), (task, key)
        assert restore[f"restore_{task}_mse_corrupted"] > 0
    assert "| inpaint |" in (dest / "metrics" / "restore.md").read_text()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], dest).stdout)
    assert "ood_auc_flip" in json.dumps(shown) and "restore_inpaint_acc_corrupted" in json.dumps(shown)
    plots = run(["dvc", "plots", "show", "--json"], dest).stdout
    for figure in ("ood_scores.png", "ood_cases.png", "restore.png"):
        assert figure in plots

    # a model scored from the command line against the threshold evaluate stored with it
    scores = run([sys.executable, "-m", "pipeline", "score", "samples/samples.npy"], dest, env=env).stdout
    assert len(scores.strip().splitlines()) == 2 + params["generate"]["n_samples"]


def test_second_repro_does_nothing(repro):
    """...also after a change of runtime.progress_seconds, which changes no output (dvc.yaml leaves it out)."""
    dest, env, _ = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["runtime"]["progress_seconds"] = 5
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = run(["dvc", "repro"], dest, env=env)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout.lower()


def test_ood_and_restore_params_make_only_their_stages_stale(repro):
    dest, env, _ = repro
    original = (dest / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["ood"]["noisy_std"] = 0.2
    params["restore"]["steps"] = 2
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        stale = json.loads(run(["dvc", "status", "--json"], dest, env=env).stdout)
    finally:
        (dest / "params.yaml").write_text(original)
    assert set(stale) == {"ood", "restore"}


def test_evaluate_param_reruns_only_evaluate(repro):
    dest, env, _ = repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["evaluate"]["n_noise"] += 6
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], dest, env=env).stdout
    assert "Running stage 'evaluate'" in out
    for stage in ("prepare", "train_classifier", "train", "generate", "ood", "restore"):
        assert f"Running stage '{stage}'" not in out
