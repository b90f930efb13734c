"""Reading an experiment back from its git ref (pipeline/experiments.py), on a hand-made repository."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, load_params
from pipeline.experiments import (
    cached_output,
    cached_outputs,
    experiment_results,
    experiment_rev,
    git_index_kept,
    json_at,
    params_at,
)
from tests.conftest import tiny_params_dict, write_params

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
    assert cached_outputs(repo, rev, "models/ebm.pt", "models/ebm.pt") == [cached, cached]
    assert cached_outputs(repo, rev, "models/ebm.pt", "samples/samples.npy") is None  # all or none


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


def test_the_git_index_is_put_back_after_an_experiment_so_git_sees_every_change(tmp_path):
    """What ``dvc exp run``'s stash and pop can leave: index entries with the popped files' timestamps
    against HEAD's content. A file modified to HEAD's size is then reported unmodified; restored, it is not."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run_id, staged = repo / "run.json", repo / "staged.txt"
    run_id.write_text('{"run_id": "aaaa"}\n')
    staged.write_text("one\n")
    old = 1_600_000_000
    for f in (run_id, staged):
        os.utime(f, (old, old))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")
    run_id.write_text('{"run_id": "bbbb"}\n')  # same size, new content: what a new run leaves
    staged.write_text("two\n")
    _git(repo, "add", "staged.txt")
    def status() -> list[str]:  # ctime aside: the pop's in-place write changes it, a timestamp-only cache does not
        cmd = ["git", "-c", "core.trustctime=false", "status", "--porcelain"]
        return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.splitlines()

    before = status()
    assert before == [" M run.json", "M  staged.txt"]
    index = Path(_git(repo, "rev-parse", "--absolute-git-dir")) / "index"

    warnings: list[str] = []
    with git_index_kept(repo, warnings.append):
        # The reset to HEAD (index refreshed from HEAD's file), then the pop writing in place ...
        content = run_id.read_bytes()
        _git(repo, "checkout", "--", "run.json")
        _git(repo, "reset", "-q", "--", "staged.txt")
        stamp = run_id.stat().st_mtime_ns
        with open(run_id, "r+b") as f:
            f.write(content)
        os.utime(run_id, ns=(stamp, stamp))
        # ... and the index written in a later second: git trusts the entry and sees nothing.
        later = index.stat().st_mtime + 5
        os.utime(index, (later, later))
        assert status() == [" M staged.txt"]
    assert run_id.read_bytes() == content
    assert status() == before
    assert warnings == ["the experiment changed what git has staged; restored as before it: staged.txt"]

    with git_index_kept(repo, warnings.append):  # an index the block leaves alone: nothing to say
        pass
    assert len(warnings) == 1 and status() == before


def test_params_at_reads_a_commit_s_params_with_the_keys_added_since_at_their_defaults(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    raw = tiny_params_dict({"generate": {"final_steps": 2}, "train": {"lr": 5e-4}})
    old = {section: dict(values) for section, values in raw.items() if section != "registry"}  # before registry
    del old["generate"]["final_steps"]  # and before the hot end
    (repo / "params.yaml").write_text(yaml.safe_dump(old))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "an older version")
    params = params_at(repo, _git(repo, "rev-parse", "HEAD"))
    assert params.train.lr == 5e-4 and params.generate.steps == raw["generate"]["steps"]  # the commit's values
    assert params.generate.final_steps == 0  # missing then: off, as the runs of that commit generated
    assert params.registry == Params().registry
    with pytest.raises(ConfigError, match="no params.yaml in commit"):
        params_at(repo, "0" * 40)
