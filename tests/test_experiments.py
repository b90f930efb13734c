"""Reading an experiment back from its git ref (pipeline/experiments.py), on a hand-made repository."""

import json
import subprocess
from pathlib import Path

from pipeline.config import load_params
from pipeline.experiments import cached_output, experiment_results, experiment_rev, json_at
from tests.conftest import write_params

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_experiment_results_reads_every_metrics_file_of_the_experiment_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    params = load_params(write_params(repo / "params.yaml"))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")
    head = _git(repo, "rev-parse", "HEAD")
    assert experiment_rev(repo, "exp-a") is None

    # What `dvc exp run` leaves: a commit on top of HEAD, under refs/exps/<HEAD[:2]>/<HEAD[2:]>/<name>.
    metrics = repo / params.paths.metrics_dir
    metrics.mkdir()
    (metrics / "train.json").write_text(json.dumps({"loss": -0.5, "steps": 12}))
    (metrics / "empty.json").write_text("{}")
    (metrics / "broken.json").write_text("{not json")
    (metrics / "list.json").write_text("[1, 2]")
    run_info = repo / params.paths.run_info
    run_info.parent.mkdir(parents=True, exist_ok=True)
    run_info.write_text(json.dumps({"run_id": "abc123"}))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "experiment")
    exp = _git(repo, "rev-parse", "HEAD")
    _git(repo, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/exp-a", exp)
    _git(repo, "reset", "-q", "--hard", head)

    assert experiment_rev(repo, "exp-a") == exp
    found, run_id, rev = experiment_results(repo, params, "exp-a")
    assert (run_id, rev) == ("abc123", exp)
    d = params.paths.metrics_dir.rstrip("/")
    assert found == {
        f"{d}/broken.json": {"error": "not a JSON object"},
        f"{d}/empty.json": {},  # empty is not broken
        f"{d}/list.json": {"error": "not a JSON object"},
        f"{d}/train.json": {"loss": -0.5, "steps": 12},
    }
    assert json_at(repo, exp, f"{d}/missing.json") == {}
    assert experiment_results(repo, params, "exp-b") == ({}, None, None)


def test_cached_output_finds_a_commit_s_dvc_output_in_the_cache(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "README").write_text("no lock yet")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "no lock")
    no_lock = _git(repo, "rev-parse", "HEAD")
    lock = {"schema": "2.0", "stages": {
        "train": {"cmd": "x", "outs": [{"path": "models/ebm.pt", "md5": "ab" + "1" * 30, "size": 3}]},
        "generate": {"cmd": "y", "outs": [{"path": "samples/samples.npy", "md5": "cd" + "2" * 30, "size": 3}]},
    }}
    (repo / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "lock")
    rev = _git(repo, "rev-parse", "HEAD")
    cached = repo / ".dvc" / "cache" / "files" / "md5" / "ab" / ("1" * 30)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"pt")

    assert cached_output(repo, rev, "models/ebm.pt") == cached
    assert cached_output(repo, rev, "samples/samples.npy") is None  # in the lock, not in this cache
    assert cached_output(repo, rev, "models/other.pt") is None  # not an output
    assert cached_output(repo, no_lock, "models/ebm.pt") is None  # no dvc.lock in that commit


def test_outputs_git_does_not_hold_yet_are_copied_into_the_experiment(tmp_path):
    """A new stage's uncached outputs, not committed yet, travel into `dvc exp run --temp`'s copy (else the
    stage would re-run there); committed and git-ignored (cached) outputs do not need to."""
    from pipeline.experiments import experiment_copy_paths

    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    params = load_params(write_params(repo / "params.yaml"))
    (repo / ".gitignore").write_text("/cached.bin\n")
    for name in ("metrics/old.json", "metrics/new.json", "metrics/new.md", "cached.bin", "notes.txt"):
        (repo / name).write_text("x")
    _git(repo, "init", "-q")
    _git(repo, "add", ".gitignore", "params.yaml", "metrics/old.json")
    _git(repo, "commit", "-qm", "baseline")
    lock = {"stages": {"s": {"outs": [{"path": p} for p in ("metrics/old.json", "metrics/new.json", "metrics/new.md",
                                                            "cached.bin", "metrics/gone.json")]}}}
    (repo / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    copied = experiment_copy_paths(repo, params)
    assert {"metrics/new.json", "metrics/new.md", "dvc.lock"} <= set(copied)
    assert not {"metrics/old.json", "cached.bin", "notes.txt", "metrics/gone.json"} & set(copied)
