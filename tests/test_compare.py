"""The recipe comparison: presets as partial params files, one DVC experiment and MLflow run per
recipe x seed, and the table built from what those runs recorded."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from tests.conftest import GIT, ROOT, run

from pipeline.compare import flatten, markdown, merge, plan, recipe_overrides
from pipeline.config import load_params


def test_book_preset_is_a_valid_partial_params_file():
    params = load_params(ROOT / "params.yaml")
    runs = plan(ROOT, params, ["book"], [0, 1, 2])
    assert [(r, s) for r, s, _ in runs] == [("book", 0), ("book", 1), ("book", 2)]
    book = recipe_overrides(ROOT, "book")
    # The book's values (Generative Deep Learning, 2nd ed., notebook 07_ebm), whatever params.yaml says.
    expected = {
        "langevin.steps": 60, "langevin.step_size": 10.0, "langevin.noise": 0.005, "langevin.grad_clip": 0.03,
        "langevin.precision": "fp32", "buffer.size": 8192, "buffer.reinit_prob": 0.05, "train.batch_size": 128,
        "train.lr": 1e-4, "train.beta1": 0.9, "train.beta2": 0.999, "train.alpha": 0.1, "train.real_noise": 0.005,
        "train.ema_decay": 0.0, "train.weight_grad_clip": 0.0, "train.lr_schedule": "constant",
        "buffer.augment_prob": 0.0, "buffer.policy": "fifo", "train.kl_weight": 0.0, "train.kl_repel": 0.0, "train.spectral_norm": False,
        "generate.steps": 1000, "generate.step_size": 10.0,
    }
    assert {k: book[k] for k in expected} == expected
    assert "train.seed=1" in runs[1][2] and "generate.seed=1" in runs[1][2]
    # --set applies to every recipe, over the recipe's own values (the book on full MNIST, say)
    on_mnist = plan(ROOT, params, ["default", "book"], [0], {"data.source": "mnist", "train.epochs": "2"})
    assert all("data.source=mnist" in args and "train.epochs=2" in args for _, _, args in on_mnist)
    assert "train.epochs=60" not in on_mnist[1][2]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))
def test_every_preset_validates_against_the_config(preset):
    params = load_params(ROOT / "params.yaml")
    (_, _, set_args), = plan(ROOT, params, [preset], [0])
    assert set_args[-2:] == ["train.seed=0", "generate.seed=0"]


def test_flatten_and_unknown_recipe(tmp_path):
    assert flatten({"train": {"lr": 0.1, "seed": 3}, "model": {"channels": [1, 2]}}) == {
        "train.lr": 0.1, "train.seed": 3, "model.channels": [1, 2]
    }
    assert recipe_overrides(tmp_path, "default") == {}
    from pipeline.compare import CompareError

    with pytest.raises(CompareError, match="no recipe 'nope'"):
        recipe_overrides(ROOT, "nope")


def test_table_means_and_floor():
    rows = [
        {"recipe": "a", "seed": 0, "fid": 10.0, "confident_share": 0.5, "coverage_entropy": 0.9,
         "train_seconds": 100.0, "steps": 10, "fid_real_floor": 2.0, "precision": "fp32", "cpu": "AMD EPYC (AVX2)"},
        {"recipe": "a", "seed": 1, "fid": 20.0, "confident_share": 0.7, "coverage_entropy": 0.8,
         "train_seconds": 110.0, "steps": 10, "fid_real_floor": 2.0},
        {"recipe": "b", "seed": 0, "fid": 30.0, "confident_share": None, "coverage_entropy": 0.7,
         "train_seconds": 50.0, "steps": 5, "fid_real_floor": 4.0},
    ]
    text = markdown(rows)
    assert "| a | 0 | 10.0 | 0.500 | 0.900 | 100 | 10 | fp32 | AMD EPYC (AVX2) |" in text
    assert "| b | 0 | 30.0 | – | 0.700 | 50 | 5 | – | – |" in text  # a row whose run is not in this store
    assert "| a | 2 | 15.0 ± 7.1 | 0.600 ± 0.141 | 0.850 ± 0.071 | 105 ± 7 | 10 ± 0 |" in text
    assert "| b | 1 | 30.0 ± 0.0 | – |" in text
    assert "floor (train subset vs test, same N): 2.7." in text
    # a against b on the seeds both ran (seed 0): a's FID is 20 lower, its coverage 0.2 higher
    assert "| a − b | 1 | -20.0 ± 0.0 (1/1 better) | – | 0.200 ± 0.000 (1/1 better) |" in text


def test_paired_differences_count_the_better_seeds():
    rows = [{"recipe": r, "seed": k, "fid": f, "confident_share": c}
            for r, k, f, c in [("a", 0, 10.0, 0.5), ("a", 1, 30.0, 0.4), ("a", 2, 5.0, 0.9),
                               ("b", 0, 20.0, 0.4), ("b", 1, 25.0, 0.5), ("b", 2, 15.0, 0.8)]]
    text = markdown(rows)
    # FID differences -10, +5, -10: mean -5.0, sd 8.66, se 5.0; a lower (better) on seeds 0 and 2
    assert "| a − b | 3 | -5.0 ± 5.0 (2/3 better) | 0.033 ± 0.067 (2/3 better) | – |" in text
    assert "a − b" not in markdown([r for r in rows if r["recipe"] == "a"])


def test_paired_row_says_when_its_runs_differ_in_cpu_or_precision():
    rows = [{"recipe": r, "seed": 0, "fid": f, "cpu": cpu, "precision": prec}
            for r, f, cpu, prec in [("a", 10.0, "AMD EPYC (AVX2)", "fp32"), ("b", 20.0, "AMD EPYC (AVX2)", "fp32"),
                                    ("c", 30.0, "Intel Xeon (AVX512)", "bf16"), ("d", 40.0, None, None)]]
    text = markdown(rows)
    assert "| a − b | 1 |" in text  # same CPU and precision: a plain row
    assert "| a − c (rows differ in CPU or sampler precision) | 1 |" in text
    assert "| a − d | 1 |" in text  # not recorded (older runs): not a difference


def test_rerunning_one_recipe_replaces_only_its_rows():
    rows = [{"recipe": "a", "seed": 0, "fid": 1.0}, {"recipe": "b", "seed": 0, "fid": 2.0}, {"recipe": "b", "seed": 1, "fid": 3.0}]
    rows = merge(rows, {"recipe": "a", "seed": 1, "fid": 4.0})
    rows = merge(rows, {"recipe": "b", "seed": 0, "fid": 5.0})
    assert [(r["recipe"], r["seed"], r["fid"]) for r in rows] == [("a", 0, 1.0), ("a", 1, 4.0), ("b", 0, 5.0), ("b", 1, 3.0)]


def test_bad_preset_value_fails_before_any_experiment(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "presets").mkdir()
    (repo / "presets" / "bad.yaml").write_text("train:\n  lr: -1\n")
    proc = run([sys.executable, "-m", "pipeline", "compare", "--recipes", "default", "bad"], repo, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare: recipe 'bad': ") and "train.lr" in lines[0]
    assert not (repo / "results").exists()


@pytest.mark.slow
def test_compare_runs_one_experiment_and_mlflow_run_per_recipe_and_seed(baseline, tmp_path, monkeypatch):
    """From a repository whose workspace was already reproduced (`make run`, then `make compare`)."""
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    repo = baseline.copy(tmp_path / "repo")
    workspace_run = json.loads((repo / "models" / "run.json").read_text())["run_id"]
    (repo / "presets" / "variant.yaml").write_text(yaml.safe_dump({"train": {"alpha": 0.2}}))
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "variant"], repo)
    args = ["--recipes", "default", "variant", "--seeds", "0", "--fresh"]
    proc = run([sys.executable, "-m", "pipeline", "compare", *args], repo)
    assert "compare: results in" in proc.stdout

    rows = json.loads((repo / "results" / "compare.json").read_text())
    assert [(r["recipe"], r["seed"], r["experiment"]) for r in rows] == [
        ("default", 0, "default-seed0"), ("variant", 0, "variant-seed0")
    ]
    # The workspace is untouched: every run happened in a temporary copy.
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["alpha"] == 0.1
    assert json.loads((repo / "models" / "run.json").read_text())["run_id"] == workspace_run
    changed = run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"], repo).stdout
    assert changed.strip() == ""  # only the table and figures under results/ are written

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for row in rows:
        mlrun = client.get_run(row["mlflow_run_id"])
        if row["recipe"] == "default":
            # The workspace's own params: DVC restores every stage from its run-cache, trains nothing,
            # and the row's run is the one that trained the workspace's model.
            assert row["mlflow_run_id"] == workspace_run
        else:
            assert mlrun.info.run_name == row["experiment"]
            assert mlrun.data.tags["dvc.exp_name"] == row["experiment"]
        assert mlrun.data.params["train.alpha"] == ("0.2" if row["recipe"] == "variant" else "0.1")
        # The table holds exactly what the run recorded.
        assert mlrun.data.metrics["evaluate.fid"] == pytest.approx(row["fid"])
        assert mlrun.data.metrics["evaluate.confident_share"] == pytest.approx(row["confident_share"])
        assert mlrun.data.metrics["train.train_seconds"] == pytest.approx(row["train_seconds"])
        tags = mlrun.data.tags  # on a GPU host the "CPU" cell names the device instead
        assert row["precision"] == tags["precision"]
        assert row["cpu"].startswith(tags.get("hardware.cpu_model") or tags["hardware.device"])
        assert (repo / "results" / row["samples"]).stat().st_size > 0
    table = (repo / "results" / "compare.md").read_text()
    assert f"| default | 0 | {rows[0]['fid']:.1f} |" in table and f"| variant | 0 | {rows[1]['fid']:.1f} |" in table
    assert (repo / "results" / "compare.png").stat().st_size > 0
    listed = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert sorted(listed) == ["default-seed0", "variant-seed0"]
