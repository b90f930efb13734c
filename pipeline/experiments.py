"""DVC experiments from Python: ``-S`` values, the environment of DVC commands, results of a run.

Shared by the Prefect flow (``pipeline/flows.py``) and the recipe comparison (``pipeline/compare.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, Params, parse_params, with_overrides


def parse_value(raw: str) -> Any:
    """A value as ``dvc exp run -S`` reads it (Hydra's override grammar, which DVC uses)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides([f"x={raw}"])[0].value()
    except OverrideParseException:
        raise ConfigError(f"params: cannot parse the value {raw!r} (DVC's -S / Hydra override syntax)") from None


def format_value(value: Any) -> str:
    """``value`` written so that ``dvc exp run -S`` reads it back unchanged."""
    if isinstance(value, str) and value.strip() and _safe_parse(value) == value:
        return value
    text = json.dumps(value)
    if _safe_parse(text) != value:
        raise ConfigError(f"params: the value {value!r} cannot be passed to dvc exp run -S")
    return text


def _safe_parse(raw: str) -> Any:
    try:
        return parse_value(raw)
    except ConfigError:
        return object()  # equal to nothing


def parse_set(items: list[str]) -> dict[str, str]:
    """``["train.alpha=0.2", ...]`` (the ``--set`` flags) -> ``{"train.alpha": "0.2", ...}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"params: --set expects KEY=VALUE (e.g. train.alpha=0.2), got {item!r}")
        out[key.strip()] = raw
    return out


def check_overrides(params: Params, overrides: dict[str, Any]) -> tuple[Params, list[str]]:
    """Validate overrides against the config; return the new params and the ``-S`` arguments.

    String values are read like ``-S`` reads them (``"1e-4"`` is a number), so a flow
    parameter from the UI and a ``--set`` flag mean the same. Raises ``ConfigError``.
    """
    values = {k: parse_value(v) if isinstance(v, str) else v for k, v in overrides.items()}
    new = with_overrides(params, values)
    return new, [f"{k}={format_value(v)}" for k, v in values.items()]


def exp_run_args(name: str | None, set_args: list[str], copy_paths: list[str]) -> list[str]:
    """The arguments of ``dvc exp run --temp [--name N] -S k=v ... --copy-paths P ...`` (after ``dvc``)."""
    args = ["exp", "run", "--temp"]
    if name:
        args += ["--name", name]
    for item in set_args:
        args += ["--set-param", item]
    for path in copy_paths:
        args += ["--copy-paths", path]
    return args


def command_env() -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter's bin directory first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",  # stream stage output as it comes
        "DVC_NO_ANALYTICS": "1",
    }


def experiment_copy_paths(repo: Path, params: Params) -> list[str]:
    """Workspace outputs that git does not hold, to copy into the experiment's temporary copy.

    ``dvc exp run --temp`` starts from the last commit (plus uncommitted changes to tracked
    files): cached outputs are checked out from the DVC cache, but uncached ones that are not
    committed (yet), like the persistent checkpoints, would be missing and their stages would
    re-run (the model would be re-trained for a change in ``generate``). Copying them, and an
    untracked dvc.lock, makes the experiment start from the workspace. So are the outputs
    recorded in dvc.lock that git neither tracks nor ignores: the uncached outputs of a stage
    whose results have not been committed yet (cached ones are git-ignored, and checked out).
    """
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True, check=False)
    tracked = set(listed.stdout.split("\0")) - {""} if listed.returncode == 0 else set()
    tracked_dirs = {str(Path(f).parents[i].as_posix()) for f in tracked for i in range(len(Path(f).parents) - 1)}
    chosen: list[str] = []
    for raw in asdict(params.paths).values():
        parts = Path(raw).parts
        if not parts or Path(raw).is_absolute() or ".." in parts:
            continue
        for i in range(len(parts)):
            prefix = Path(*parts[: i + 1]).as_posix()
            if prefix not in tracked_dirs:
                if prefix not in tracked and (repo / prefix).exists():
                    chosen.append(prefix)
                break
    if (repo / "dvc.lock").is_file() and "dvc.lock" not in tracked:
        chosen.append("dvc.lock")
    chosen += _uncommitted_outputs(repo)
    unique = sorted(set(chosen))
    return [p for p in unique if not any(p.startswith(q + "/") for q in unique if q != p)]


def _uncommitted_outputs(repo: Path) -> list[str]:
    """Files that dvc.lock records as stage outputs and that git neither tracks nor ignores."""
    try:
        lock = yaml.safe_load((repo / "dvc.lock").read_text()) or {}
        outs = {out["path"] for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])}
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return []
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=repo, capture_output=True, text=True, check=False
    )
    others = set(listed.stdout.split("\0")) - {""} if listed.returncode == 0 else set()
    return sorted(path for path in outs if path in others)


def _git_index_path(repo: Path) -> Path | None:
    found = subprocess.run(["git", "rev-parse", "--git-path", "index"], cwd=repo, capture_output=True, text=True)
    if found.returncode != 0 or not found.stdout.strip():
        return None
    path = Path(found.stdout.strip())
    return path if path.is_absolute() else repo / path


def _staged(repo: Path) -> dict[str, str]:
    """``path -> "mode oid stage"`` of every index entry (what is staged, without the stat cache)."""
    listed = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=repo, capture_output=True, text=True)
    out = {}
    for record in listed.stdout.split("\0"):
        info, _, path = record.partition("\t")
        if path:
            out[path] = info
    return out


@contextlib.contextmanager
def git_index_kept(repo: Path, warn: Callable[[str], None]) -> Iterator[None]:
    """Put the git index back, byte for byte, as it was before the block (a ``dvc exp run``).

    ``dvc exp run`` stashes the uncommitted changes, resets the workspace to HEAD and pops the stash
    (libgit2, in place). When the reset and the pop write a file within the same second and the
    index is written in a later one, the index records the popped file's timestamps against HEAD's
    content: git trusts that cache, so a file modified to the same size as HEAD's (a run id, a
    metric of fixed width) is reported unmodified, and its staged state can change too. The index
    as it was is right for every file the block did not change and makes git re-read the ones it
    rewrote. Paths whose staged content differs afterwards are named through ``warn``.
    """
    path = _git_index_path(repo)
    before = path.read_bytes() if path is not None and path.is_file() else None
    staged = _staged(repo) if before is not None else {}
    try:
        yield
    finally:
        if before is not None and path is not None and path.read_bytes() != before:
            now = _staged(repo)
            changed = sorted(p for p in set(staged) | set(now) if staged.get(p) != now.get(p))
            lock = path.with_name(path.name + ".lock")
            try:  # git's own protocol: take index.lock, write it, rename it over the index
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                warn(f"git index not restored after the experiment: {lock} exists (another git command?)")
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(before)
                os.replace(lock, path)
                if changed:
                    warn(
                        "the experiment changed what git has staged; restored as before it: "
                        + ", ".join(changed[:10]) + (f" (+{len(changed) - 10} more)" if len(changed) > 10 else "")
                    )


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=False)


def experiment_rev(repo: Path, name: str) -> str | None:
    """The commit of experiment ``name`` run from the current HEAD, or None.

    DVC keeps it as ``refs/exps/<HEAD[:2]>/<HEAD[2:]>/<name>``. Looked up by ref rather than by
    name in ``dvc exp show``, which also lists failed or interrupted attempts of the same name.
    """
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    found = git(repo, "rev-parse", "--verify", "--quiet", f"refs/exps/{head[:2]}/{head[2:]}/{name}")
    return found.stdout.decode().strip() if found.returncode == 0 else None


def json_at(repo: Path, rev: str, path: str) -> dict[str, Any]:
    """The JSON object ``path`` holds in commit ``rev``; {} when missing or not an object."""
    data = _json_object_at(repo, rev, path)
    return {} if data is None else data


def _json_object_at(repo: Path, rev: str, path: str) -> dict[str, Any] | None:
    """The JSON object ``path`` holds in commit ``rev``; None when missing, not JSON or not an object."""
    shown = git(repo, "show", f"{rev}:{path}")
    if shown.returncode != 0:
        return None
    try:
        data = json.loads(shown.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def params_at(repo: Path, rev: str) -> Params:
    """The params of commit ``rev`` (its params.yaml), with the keys added since at their defaults.

    A key's default (the ``Params`` dataclasses') is the behaviour from before the key existed: every lever
    is off by default. So the params of an older experiment describe the run it was. Raises ``ConfigError``.
    """
    shown = git(repo, "show", f"{rev}:params.yaml")
    if shown.returncode != 0:
        raise ConfigError(f"params: no params.yaml in commit {rev}")
    raw = yaml.safe_load(shown.stdout) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: params.yaml of commit {rev} must hold a mapping of sections")
    defaults = Params()
    for section in fields(Params):
        given = raw.get(section.name)
        raw[section.name] = {**asdict(getattr(defaults, section.name)), **(given if isinstance(given, dict) else {})}
    return parse_params(raw)


def cached_outputs(repo: Path, rev: str, *paths: str) -> list[Path] | None:
    """The files of DVC outputs ``paths`` as commit ``rev``'s dvc.lock records them, in this repository's DVC cache.

    None unless all are there: when ``rev`` has no dvc.lock, the lock names no such output, or the cache does
    not hold it (another clone's experiment, or a pruned cache).
    """
    shown = git(repo, "show", f"{rev}:dvc.lock")
    if shown.returncode != 0:
        return None
    lock = yaml.safe_load(shown.stdout) or {}
    md5s = {o.get("path"): o.get("md5") for st in lock.get("stages", {}).values() for o in st.get("outs", [])}
    files = []
    for path in paths:
        md5 = md5s.get(path)
        file = Path(repo) / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:] if md5 else None
        if file is None or not file.is_file():
            return None
        files.append(file)
    return files


def cached_output(repo: Path, rev: str, path: str) -> Path | None:
    """``cached_outputs`` for one output: its file in the cache, or None."""
    found = cached_outputs(repo, rev, path)
    return found[0] if found else None


def experiment_results(repo: Path, params: Params, name: str) -> tuple[dict[str, Any], str | None, str | None]:
    """Experiment ``name``'s metrics files (path -> values), its MLflow run id and its commit."""
    rev = experiment_rev(repo, name)
    if rev is None:
        return {}, None, None
    metrics_dir = Path(params.paths.metrics_dir).as_posix().rstrip("/")
    listed = git(repo, "ls-tree", "--name-only", f"{rev}:{metrics_dir}").stdout.decode().split()
    metrics = {}
    for file in sorted(listed):
        if file.endswith(".json"):
            data = _json_object_at(repo, rev, f"{metrics_dir}/{file}")
            metrics[f"{metrics_dir}/{file}"] = {"error": "not a JSON object"} if data is None else data
    run_id = json_at(repo, rev, Path(params.paths.run_info).as_posix()).get("run_id")
    return metrics, run_id, rev
