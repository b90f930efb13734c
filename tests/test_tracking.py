"""Issue 3: experiment tracking (MLflow) and versioning (DVC), on the tiny configuration.

One module-scoped repository copy pays for the expensive part once: `dvc repro` with the
default store (mlflow.db and mlartifacts/ at the repository root), a baseline commit, then
`dvc exp run -S train.alpha=0.2` and `dvc exp run -S buffer.size=4096` from that baseline, queued
and run side by side, both writing into that one SQLite store.
Every assertion on runs, metrics, artifacts, experiments and the DVC remote reads from it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline import tracking
from tests.conftest import GIT, ROOT, run, run_queue, write_params
EXPERIMENT = "ebm-mnist"
STEP_METRICS = ("loss", "cdiv", "reg", "real_score", "fake_score", "grad_norm", "buffer_fill")
CACHED_OUTS = (
    "data/prepared/train.pt",
    "data/prepared/test.pt",
    "models/ebm.pt",
    "models/classifier.pt",
    "samples/samples.npy",
)
EXPERIMENTS = {"alpha": ("train.alpha", "0.2"), "bufsize": ("buffer.size", "4096")}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_md5(lock: dict, path: str) -> str:
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return out["md5"]
    raise KeyError(path)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def numeric_leaves(d: dict, prefix: str) -> dict[str, float]:
    flat = flatten(d, f"{prefix}.")
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def logged_images(client, run_id: str) -> dict[str, list[int]]:
    """Image series logged with mlflow.log_image(key=..., step=...): key -> sorted steps (full-size PNGs)."""
    out: dict[str, list[int]] = {}
    for f in client.list_artifacts(run_id, "images"):
        name = f.path.split("/", 1)[1]
        if name.endswith(".png"):  # beside each: a compressed .webp preview
            key, step_word, step, *_ = name[: -len(".png")].split("+")
            assert step_word == "step", name
            out.setdefault(key.replace("~", "/"), []).append(int(step))
    return {k: sorted(v) for k, v in out.items()}


def same_param(logged: str, value) -> bool:
    """MLflow holds params as strings: lists as JSON, everything else as str()."""
    if isinstance(value, list):
        return json.loads(logged) == value
    if isinstance(value, bool) or isinstance(value, str):
        return logged == str(value)
    return float(logged) == float(value)


@dataclass
class Repo:
    path: Path
    uri: str
    branch: str
    baseline_rev: str
    baseline_lock: dict
    runs_after_repro: list
    exps: dict = field(default_factory=dict)  # key -> {"name", "rev", "run_id", "model_md5"}

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def run_id_at(self, rev: str) -> str:
        proc = run(["git", "show", f"{rev}:models/run.json"], self.path)
        return json.loads(proc.stdout)["run_id"]

    @property
    def baseline_run_id(self) -> str:
        return self.run_id_at(self.baseline_rev)


@pytest.fixture(scope="module")
def repo(baseline, tmp_path_factory) -> Repo:
    """A copy of the session's tiny `dvc repro` (default store, committed as the baseline after the repro)."""
    mp = pytest.MonkeyPatch()
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        mp.delenv(var, raising=False)
    dest = baseline.copy(tmp_path_factory.mktemp("tracking") / "repo")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{dest / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    rev = run(["git", "rev-parse", "HEAD"], dest).stdout.strip()
    assert rev == baseline.rev
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], dest).stdout.strip()
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    yield Repo(dest, uri, branch, rev, lock, runs)
    mp.undo()


@pytest.fixture(scope="module")
def exp_repo(repo) -> Repo:
    """Two `dvc exp run -S` from the baseline, queued and run side by side (`dvc queue start -j 2`).

    Both write into the workspace's one SQLite store at once, and both go through the registry's gate;
    the workspace itself stays at the baseline.
    """
    for key, (param, value) in EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", "-q", "-n", key, "-S", f"{param}={value}"], repo.path)
    status = run_queue(repo.path, EXPERIMENTS)
    assert status.count("Success") == len(EXPERIMENTS), status
    for key in EXPERIMENTS:
        rev = run(["git", "rev-parse", f"refs/exps/{repo.baseline_rev[:2]}/{repo.baseline_rev[2:]}/{key}"], repo.path)
        rev = rev.stdout.strip()
        lock = yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], repo.path).stdout)
        model_md5 = lock_md5(lock, "models/ebm.pt")
        repo.exps[key] = {"name": key, "rev": rev, "run_id": repo.run_id_at(rev), "model_md5": model_md5}
    return repo


# ------------------------------------------------------------------ one pipeline run, one MLflow run


@pytest.mark.slow
def test_default_store_at_repo_root_ignored_and_not_a_dvc_output(repo):
    assert (repo.path / "mlflow.db").is_file()
    exp = repo.client().get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location == (repo.path.resolve() / "mlartifacts" / EXPERIMENT).as_uri()
    run_dir = repo.path / "mlartifacts" / EXPERIMENT / repo.baseline_run_id / "artifacts"
    assert (run_dir / "metrics" / "evaluate.json").is_file()
    assert not (repo.path / "mlruns").exists()
    # git-ignored: the baseline commit (git add -A after the repro) holds neither
    committed = run(["git", "ls-files"], repo.path).stdout.split()
    assert not any(p == "mlflow.db" or p.startswith(("mlartifacts/", "mlruns/")) for p in committed)
    run(["git", "check-ignore", "mlflow.db", "mlartifacts/x"], repo.path)  # exits 1 if either is not ignored
    # never DVC outputs
    lock_paths = {out["path"] for stage in repo.baseline_lock["stages"].values() for out in stage.get("outs", [])}
    assert not any(p.startswith(("mlflow", "mlartifacts", "mlruns")) for p in lock_paths)
    # the small uncached outputs are committed, so dvc exp show / metrics diff can read them
    for path in ("metrics/train.json", "metrics/evaluate.json", "models/run.json", "plots/train.csv"):
        assert path in committed


@pytest.mark.slow
def test_one_run_with_every_param_and_the_tags(repo):
    assert repo.runs_after_repro == [repo.baseline_run_id]  # one repro, one run, in the store
    r = repo.client().get_run(repo.baseline_run_id)
    assert r.info.status == "FINISHED"

    params = flatten(yaml.safe_load((repo.path / "params.yaml").read_text()))
    # every value of params.yaml, and the sampler's precision and kernels as they resolved on this machine
    assert set(r.data.params) == set(params) | {"langevin.precision_resolved", "langevin.kernels_resolved"}
    trained = json.loads((repo.path / "metrics/train.json").read_text())
    assert r.data.params["langevin.precision_resolved"] == trained["precision"] in ("fp32", "bf16")
    assert r.data.params["langevin.kernels_resolved"] == trained["kernels"] in ("compiled", "aten")
    assert trained["precision"] == "fp32" or trained["kernels"] == "aten"  # compiled kernels serve fp32 only
    for key in ("langevin.step_size", "train.alpha", "buffer.size", "buffer.reinit_prob", "model.channels"):
        assert key in r.data.params
    bad = {k: (r.data.params[k], v) for k, v in params.items() if not same_param(r.data.params[k], v)}
    assert not bad

    tags = r.data.tags
    head = run(["git", "rev-parse", "HEAD~1"], repo.path).stdout.strip()  # the commit the repro ran on
    assert tags["git.commit"] == head
    assert tags["git.dirty"] == "false"
    assert tags["dvc.data_md5.train"] == lock_md5(repo.baseline_lock, "data/prepared/train.pt")
    assert tags["dvc.data_md5.test"] == lock_md5(repo.baseline_lock, "data/prepared/test.pt")
    assert tags["dvc.model_md5"] == lock_md5(repo.baseline_lock, "models/ebm.pt")
    import torch

    # runtime.device auto: CUDA where this machine has it, else the CPU (the stages ran in this environment)
    assert tags["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert tags["device"] == tags["hardware.device"]
    assert tags["precision"] == trained["precision"]
    assert tags["kernels"] == trained["kernels"]
    assert tags["torch"] == torch.__version__


@pytest.mark.slow
def test_loss_history_has_one_point_per_logged_step(repo):
    with open(repo.path / "plots/train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(float(row["step"])) for row in rows]
    every = yaml.safe_load((repo.path / "params.yaml").read_text())["train"]["log_every"]
    n = json.loads((repo.path / "metrics/train.json").read_text())["steps"]
    assert steps == [s for s in range(1, n + 1) if s % every == 0 or s == n]
    client = repo.client()
    for key in STEP_METRICS:
        history = sorted(client.get_metric_history(repo.baseline_run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == steps, key
        for m, row in zip(history, rows):
            assert m.value == pytest.approx(float(row[key]), rel=1e-5, abs=1e-9), (key, m.step)


@pytest.mark.slow
def test_run_holds_stage_metrics_artifacts_and_model(repo):
    client = repo.client()
    run_id = repo.baseline_run_id
    metrics = client.get_run(run_id).data.metrics
    for stem in ("train", "generate", "evaluate", "ood", "restore"):
        expected = numeric_leaves(json.loads((repo.path / f"metrics/{stem}.json").read_text()), stem)
        assert expected and {k: metrics[k] for k in expected} == expected

    def walk(path=None):
        for f in client.list_artifacts(run_id, path):
            yield from walk(f.path) if f.is_dir else [f.path]

    artifacts = set(walk())
    cfg = yaml.safe_load((repo.path / "params.yaml").read_text())["train"]
    n_steps = json.loads((repo.path / "metrics/train.json").read_text())["steps"]
    grid_steps = [
        s for s in range(cfg["sample_every"], n_steps + 1, cfg["sample_every"]) if s % cfg["log_every"] == 0
    ]
    assert grid_steps  # the tiny config logs at least one buffer grid
    # Buffer grids and the final sample grid as image series with steps (the UI's step slider).
    from pipeline.stages.generate import SAMPLE_IMAGES
    from pipeline.stages.train import BUFFER_IMAGES

    # (step 0: the uniform noise an empty buffer hands the sampler)
    assert logged_images(client, run_id) == {BUFFER_IMAGES: [0, *grid_steps], SAMPLE_IMAGES: [n_steps]}
    expected = {
        "figures/samples.png",  # the final sample grid, as DVC tracks it
        "figures/chain.png",
        "figures/energy_hist.png",
        "figures/train_curves.png",
        "metrics/train.json",
        "metrics/generate.json",
        "metrics/evaluate.json",
        "metrics/threshold.json",  # the in/out threshold stored with the model
        "metrics/ood.json",
        "metrics/ood.md",
        "metrics/restore.json",
        "metrics/restore.md",
        "figures/ood_scores.png",
        "figures/ood_cases.png",
        "figures/restore.png",
    }
    assert expected <= artifacts, expected - artifacts
    local = Path(client.download_artifacts(run_id, "metrics/evaluate.json"))
    assert local.read_bytes() == (repo.path / "metrics/evaluate.json").read_bytes()

    # the energy network as an MLflow model with a signature and explicit requirements
    import mlflow
    import mlflow.pytorch
    import torch

    from pipeline.stages.common import load_energy_model

    with tracking.using_uri(repo.uri):
        models = mlflow.search_logged_models(
            experiment_ids=[client.get_run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            output_format="list",
        )
        # the energy network, and the scoring pyfunc the register stage logged (and registered)
        assert sorted(m.name for m in models) == sorted([tracking.MODEL_NAME, tracking.SCORING_MODEL])
        models = [m for m in models if m.name == tracking.MODEL_NAME]
        uri = f"models:/{models[0].model_id}"
        info = mlflow.models.get_model_info(uri)
        assert info.signature is not None and info.signature.inputs is not None
        reqs = mlflow.artifacts.download_artifacts(f"{models[0].artifact_location}/requirements.txt")
        reqs = Path(reqs).read_text().split()
        assert f"torch=={torch.__version__.split('+')[0]}" in reqs
        logged = mlflow.pytorch.load_model(uri)  # a torch.export graph: needs no pipeline code
    mine, _ = load_energy_model(repo.path / "models/ebm.pt", torch.device("cpu"))
    x = torch.rand(5, 1, 32, 32) * 2 - 1  # another batch size than the input example's
    with torch.no_grad():
        assert torch.allclose(logged(x), mine(x), rtol=1e-5, atol=1e-6)
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # using_uri put the process back


@pytest.mark.slow
def test_ui_sees_a_training_experiment_with_source_description_and_datasets(repo):
    client = repo.client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND  # opens on the runs table
    r = client.get_run(repo.baseline_run_id)
    tags = r.data.tags
    head = run(["git", "rev-parse", "HEAD~1"], repo.path).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head  # the Version column
    assert tags["mlflow.source.type"] == "PROJECT" and tags["mlflow.project.entryPoint"] == "train"  # Source
    assert Path(tags["mlflow.source.name"]).name == repo.path.name
    assert tags["mlflow.source.git.branch"] == repo.branch
    note = tags["mlflow.note.content"]  # the run's description
    assert "Recipe:** `default`" in note and "DVC experiment:** none" in note
    assert "Params changed from the commit's params.yaml:** none" in note
    assert lock_md5(repo.baseline_lock, "data/prepared/train.pt") in note
    # The prepared splits as dataset inputs, named after the source, digest = the md5 in dvc.lock.
    inputs = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in r.inputs.dataset_inputs}
    assert inputs == {
        ("mnist5k-train", lock_md5(repo.baseline_lock, "data/prepared/train.pt"), "training"),
        ("mnist5k-test", lock_md5(repo.baseline_lock, "data/prepared/test.pt"), "evaluation"),
    }


@pytest.mark.slow
def test_repro_registers_version_1_as_champion(repo):
    info = json.loads((repo.path / "models/registry.json").read_text())
    fid = json.loads((repo.path / "metrics/evaluate.json").read_text())["fid"]
    assert info["registered"] and (info["version"], info["alias"], info["promoted"]) == ("1", "champion", True)
    assert info["fid"] == fid and info["run_id"] == repo.baseline_run_id
    mv = repo.client().get_model_version_by_alias(info["model_name"], "champion")
    assert str(mv.version) == "1" and mv.run_id == repo.baseline_run_id
    assert mv.tags["dvc.model_md5"] == lock_md5(repo.baseline_lock, "models/ebm.pt")
    assert float(mv.tags["fid"]) == fid and mv.tags["gate.decision"] == info["reason"]
    # The registered model is the scoring pyfunc; its artifact is the DVC model file itself.
    import mlflow

    with tracking.using_uri(repo.uri):
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{info['model_name']}/1"))
    assert md5(next(model_dir.rglob("ebm.pt"))) == lock_md5(repo.baseline_lock, "models/ebm.pt")


@pytest.mark.slow
def test_dvc_artifacts_get_retrieves_the_model_of_a_tagged_version(repo, tmp_path):
    # dvc.yaml declares the model as the artifact ebm-mnist; a version is a GTO tag on a commit.
    run([*GIT, "tag", "-a", "ebm-mnist@v1.0.0", "-m", "ebm-mnist v1.0.0", repo.baseline_rev], repo.path)
    for args, name in (([], "latest.pt"), (["--rev", "v1.0.0"], "v1.pt")):
        run(["dvc", "artifacts", "get", str(repo.path), "ebm-mnist", *args, "-o", str(tmp_path / name)], tmp_path)
        assert md5(tmp_path / name) == lock_md5(repo.baseline_lock, "models/ebm.pt")


# ------------------------------------------------------------------ DVC experiments


@pytest.mark.slow
def test_experiments_are_runs_that_differ_in_exactly_the_set_param(exp_repo):
    import mlflow

    with tracking.using_uri(exp_repo.uri):
        df = mlflow.search_runs(experiment_names=[EXPERIMENT])
    run_ids = {exp["run_id"] for exp in exp_repo.exps.values()} | {exp_repo.baseline_run_id}
    assert set(df["run_id"]) == run_ids and len(df) == 3  # one run per training, nothing else
    client = exp_repo.client()
    base = client.get_run(exp_repo.baseline_run_id).data.params
    for key, (param, value) in EXPERIMENTS.items():
        r = client.get_run(exp_repo.exps[key]["run_id"])
        assert r.info.status == "FINISHED"
        assert set(r.data.params) == set(base)
        assert {k for k in base if r.data.params[k] != base[k]} == {param}
        assert r.data.params[param] == value
        assert r.data.tags["dvc.exp_name"] == key and r.info.run_name == key
        assert r.data.tags["dvc.exp_baseline_rev"] == exp_repo.baseline_rev
        assert r.data.tags["dvc.model_md5"] == exp_repo.exps[key]["model_md5"]
        assert not [t for t in r.data.tags if t.startswith("param_changed.")]
    # alpha changes the model; the queued experiments left the workspace's model as it was
    assert exp_repo.exps["alpha"]["model_md5"] != lock_md5(exp_repo.baseline_lock, "models/ebm.pt")
    assert md5(exp_repo.path / "models/ebm.pt") == lock_md5(exp_repo.baseline_lock, "models/ebm.pt")


@pytest.mark.slow
def test_dvc_exp_show_lists_the_metrics_mlflow_shows(exp_repo):
    shown = json.loads(run(["dvc", "exp", "show", "--json"], exp_repo.path).stdout)
    rows = {}
    for baseline in shown:
        if baseline["rev"] == exp_repo.baseline_rev:
            rows[baseline["rev"]] = baseline["data"]
            for exp in baseline.get("experiments") or []:
                for rev in exp["revs"]:
                    rows[rev["rev"]] = rev["data"]
    wanted = {exp_repo.baseline_rev: exp_repo.baseline_run_id} | {e["rev"]: e["run_id"] for e in exp_repo.exps.values()}
    assert set(wanted) <= set(rows)
    client = exp_repo.client()
    for rev, run_id in wanted.items():
        dvc_metrics = {}
        for path, entry in rows[rev]["metrics"].items():
            assert "error" not in entry, (rev, path, entry)
            dvc_metrics.update(numeric_leaves(entry["data"], Path(path).stem))
        assert {"train.final_loss", "evaluate.fid", "generate.steps", "classifier.test_accuracy"} <= set(dvc_metrics)
        mlflow_final = {k: v for k, v in client.get_run(run_id).data.metrics.items() if "." in k}
        assert mlflow_final == dvc_metrics, rev


@pytest.mark.slow
def test_experiments_pass_through_the_gate(exp_repo):
    """Each experiment's model is one more version; the aliases are what the gate decides from the FIDs."""
    from pipeline import gate

    client = exp_repo.client()
    margin = yaml.safe_load((exp_repo.path / "params.yaml").read_text())["registry"]["fid_margin"]
    by_run = {mv.run_id: mv for mv in client.search_model_versions("name = 'ebm-mnist'")}
    # One version per trained model; the two experiments ran side by side, so the gate took them in the
    # order they finished, one at a time: replay its decisions in the order of the version numbers.
    assert set(by_run) == {exp_repo.baseline_run_id} | {e["run_id"] for e in exp_repo.exps.values()}
    assert str(by_run[exp_repo.baseline_run_id].version) == "1"
    order = sorted(by_run, key=lambda run_id: int(by_run[run_id].version))
    assert [str(by_run[r].version) for r in order] == ["1", "2", "3"]
    champion, challenger = None, None
    for run_id in order:
        fid = client.get_run(run_id).data.metrics["evaluate.fid"]
        version = str(by_run[run_id].version)
        decision = gate.decide(version, fid, champion, margin)
        assert by_run[run_id].tags["gate.alias"] == decision.alias
        assert by_run[run_id].tags["gate.decision"].startswith(decision.reason)
        if decision.promoted:
            champion = gate.Champion(version, fid)
        else:
            challenger = version
    assert str(client.get_model_version_by_alias("ebm-mnist", "champion").version) == champion.version
    if challenger:
        assert str(client.get_model_version_by_alias("ebm-mnist", "challenger").version) == challenger
    # Each experiment's description names it and the param it set.
    for key, (param, value) in EXPERIMENTS.items():
        note = client.get_run(exp_repo.exps[key]["run_id"]).data.tags["mlflow.note.content"]
        assert f"DVC experiment:** `{key}`" in note and f"`{param}`" in note and f"→ {value}" in note


# ------------------------------------------------------------------ DVC remote


@pytest.mark.slow
def test_push_remove_pull_restores_data_and_model_bit_for_bit(exp_repo, tmp_path):
    path = exp_repo.path
    run(["dvc", "remote", "add", "--local", "-d", "store", str(tmp_path / "remote")], path)
    before = {rel: md5(path / rel) for rel in CACHED_OUTS}
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert before == {rel: lock_md5(lock, rel) for rel in CACHED_OUTS}
    run(["dvc", "push", "-q"], path)
    for rel in CACHED_OUTS:
        (path / rel).unlink()
    shutil.rmtree(path / ".dvc" / "cache")
    run(["dvc", "pull", "-q"], path)
    assert {rel: md5(path / rel) for rel in CACHED_OUTS} == before
    assert json.loads(run(["dvc", "status", "--json"], path).stdout) == {}


# ------------------------------------------------------------------ failing early


def test_unreachable_server_fails_before_training_in_one_line(tmp_path):
    write_params(tmp_path / "params.yaml")
    env = {"PYTHONWARNINGS": "ignore"}
    run([sys.executable, "-m", "pipeline", "prepare"], tmp_path, env=env)
    uri = "http://127.0.0.1:9"
    proc = run(
        [sys.executable, "-m", "pipeline", "train"], tmp_path, env={**env, "MLFLOW_TRACKING_URI": uri}, check=False
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and lines[0].startswith("tracking:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "train:" not in proc.stdout
    assert not (tmp_path / "models").exists()  # no model, no checkpoint, no run.json
    assert not (tmp_path / "mlflow.db").exists()


def test_sqlite_uri_override_keeps_artifacts_beside_that_database(tmp_path, monkeypatch, mlflow_uri):
    from pipeline.config import TrackingConfig

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # not where the database is
    assert tracking.tracking_uri() == mlflow_uri
    tracker = tracking.start_run(TrackingConfig(experiment="override"), run_name="t")
    (work / "note.txt").write_text("x")
    tracker.log_artifact(work / "note.txt", "notes")
    tracker.close()
    assert (tmp_path / "mlartifacts" / "override" / tracker.run_id / "artifacts" / "notes" / "note.txt").is_file()
    assert not (work / "mlruns").exists() and not (work / "mlflow.db").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_uri  # untouched by the tracker


def test_make_ui_serves_the_pipeline_store():
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    proc = subprocess.run(["make", "-n", "-o", "setup", "ui"], cwd=ROOT, capture_output=True, text=True, check=True)
    words = proc.stdout.replace("\\\n", " ").replace('"', " ").split()
    option = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    root = ROOT.resolve()
    assert option["--backend-store-uri"] == f"sqlite:///{root / tracking.DEFAULT_DB}"
    assert option["--default-artifact-root"] == (root / tracking.DEFAULT_ARTIFACTS).as_uri()
    assert option["--artifacts-destination"] == (root / tracking.DEFAULT_ARTIFACTS).as_uri()
    assert option["--host"] == "127.0.0.1"
    # the pipeline, run from the same root without MLFLOW_TRACKING_URI, uses the same store
    assert tracking.artifact_root(f"sqlite:///{root / tracking.DEFAULT_DB}") == root / tracking.DEFAULT_ARTIFACTS


def test_later_stage_records_params_that_differ_from_the_run(mlflow_uri, capsys):
    from pipeline.config import TrackingConfig

    cfg = TrackingConfig(experiment="drift")
    tracker = tracking.start_run(cfg, run_name="t")
    tracker.log_params({"generate.steps": 6, "model.channels": [1, 2]})
    tracker.close()
    again = tracking.resume_run(cfg, tracker.run_id, {"generate.steps": 10, "model.channels": [1, 2]})
    again.close()
    from mlflow.tracking import MlflowClient

    r = MlflowClient(tracking_uri=mlflow_uri).get_run(tracker.run_id)
    assert r.data.params["generate.steps"] == "6"  # MLflow params never change
    assert {k: v for k, v in r.data.tags.items() if k.startswith("param_changed.")} == {
        "param_changed.generate.steps": "6 -> 10"
    }
    assert r.info.status == "FINISHED"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tracking:")]
    assert len(err) == 1 and "generate.steps" in err[0]


def test_tracking_failure_after_the_start_warns_once_and_never_raises(capsys):
    from mlflow.exceptions import MlflowException

    class DeadClient:
        calls = 0

        def log_batch(self, *args, **kwargs):
            DeadClient.calls += 1
            raise MlflowException("API request to http://gone failed: Connection refused\nmore detail")

        def set_terminated(self, *args, **kwargs):
            raise AssertionError("no calls after the first failure")

    tracker = tracking.MlflowTracker(DeadClient(), "abc", "http://gone")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=2)
    tracker.set_tags({"a": "b"})
    tracker.close("FINISHED")
    assert DeadClient.calls == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "http://gone" in err[0] and "run abc is incomplete" in err[0]


def test_project_root_of_dvc_temp_experiments(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    temp_exp = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_exp.mkdir(parents=True)
    (temp_exp / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.project_root(temp_exp) == tmp_path
    monkeypatch.chdir(temp_exp)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC exports to every stage it runs
    monkeypatch.chdir(tmp_path.parent)
    assert tracking.project_root() == tmp_path.resolve()
    location = tracking.artifact_location("sqlite:////x/y/mlflow.db", "ebm mnist/v2")
    assert location == "file:///x/y/mlartifacts/ebm-mnist-v2"
    assert tracking.artifact_location("http://127.0.0.1:5000", "ebm-mnist") is None


def test_model_training_experiment_images_with_steps_and_a_dataset_with_the_dvc_md5(tmp_path, mlflow_uri):
    import numpy as np
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig
    from pipeline.stages.common import file_md5

    client = MlflowClient(tracking_uri=mlflow_uri)
    client.create_experiment("older")  # e.g. made by an earlier version of the pipeline, or from the UI
    tracking.start_run(TrackingConfig(experiment="older"), run_name="t").close()
    tracker = tracking.start_run(TrackingConfig(experiment="fresh"), run_name="t")
    for name in ("fresh", "older"):  # created, and kept, as model-training experiments
        assert client.get_experiment_by_name(name).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    exp_id = client.get_experiment_by_name("fresh").experiment_id
    url = tracking.ui_url("http://127.0.0.1:5000", "fresh", mlflow_uri)
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    none_yet = tracking.ui_url("http://h:1/", "none yet", mlflow_uri)
    assert none_yet == "http://h:1/#/experiments?workflowType=machine_learning"

    for step in (10, 20):
        tracker.log_image(np.full((8, 8), step / 20), key="samples/replay_buffer", step=step)
    split = tmp_path / "train.pt"
    split.write_bytes(b"prepared digits")
    images, labels = np.zeros((3, 1, 32, 32), np.float32), np.arange(3)
    tracker.log_dataset(
        name="mnist5k-train", digest=file_md5(split), source=split, features=images, targets=labels, context="training"
    )
    tracker.close()
    assert logged_images(client, tracker.run_id) == {"samples/replay_buffer": [10, 20]}
    (given,) = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("mnist5k-train", file_md5(split))
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]
    assert json.loads(given.dataset.source) == {"uri": str(split.resolve())}
    assert json.loads(given.dataset.profile)["features_shape"] == [3, 1, 32, 32]


def test_run_description_names_recipe_experiment_and_changed_params(tmp_path, monkeypatch):
    from pipeline import provenance
    from pipeline.config import parse_params
    from tests.conftest import tiny_params_dict

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "fast.yaml").write_text("train:\n  alpha: 0.2\n")
    write_params(tmp_path / "params.yaml")
    run(["git", "init", "-q"], tmp_path)
    run([*GIT, "add", "-A"], tmp_path)
    run([*GIT, "commit", "-qm", "x"], tmp_path)
    current = parse_params(tiny_params_dict({"train": {"alpha": 0.2}})).flat()
    note = provenance.describe_run(
        current, tmp_path, tmp_path, "train", {"dvc.exp_name": "fast-seed0", "dvc.exp_baseline_rev": "abcdef123456"}
    )
    assert note.splitlines()[0] == "fast recipe · DVC experiment fast-seed0 · changed: train.alpha 0.1 → 0.2"
    assert "**Recipe:** `fast` (`presets/fast.yaml`" in note
    assert "**DVC experiment:** `fast-seed0` from baseline commit `abcdef1`" in note
    assert "**Params changed from the commit's params.yaml:** `train.alpha` 0.1 → 0.2" in note
    same = parse_params(tiny_params_dict()).flat()
    plain = provenance.describe_run(same, tmp_path, tmp_path, "train")
    assert plain.splitlines()[0] == "default recipe · dvc repro · params as committed"
    assert "changed from the commit's params.yaml:** none" in plain


def test_remote_urls_lose_their_credentials_before_reaching_mlflow():
    assert tracking._without_credentials("https://me:ghp_secret@github.com/o/r.git") == "https://github.com/o/r.git"
    assert tracking._without_credentials("git@github.com:o/r.git") == "git@github.com:o/r.git"
    assert tracking._without_credentials(None) is None
