"""Where a run comes from, in words: the recipe, the DVC experiment and the params changed from the commit.

The MLflow UI shows this text as the run's description (tracking.py writes it as MLflow's
``mlflow.note.content`` tag). Pure functions over git, params.yaml and ``presets/``; no mlflow here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.compare import DEFAULT, PRESETS_DIR, CompareError, flatten, recipe_overrides

PARAMS_FILE = "params.yaml"


def git(where: Path, *args: str) -> str | None:
    """``git <args>`` in ``where``: its stripped stdout, or None when git or the repository is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def committed_params(where: Path) -> dict[str, Any] | None:
    """params.yaml as the checked-out commit holds it, flattened; None outside git or when not committed.

    Inside ``dvc exp run`` (also ``--temp``) HEAD is the experiment's baseline and params.yaml
    carries the ``-S`` values, so the difference is exactly what the experiment set.
    """
    text = git(where, "show", f"HEAD:./{PARAMS_FILE}")
    if text is None:
        return None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return flatten(raw) if isinstance(raw, dict) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _text(value: Any) -> str:
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)


def param_changes(current: dict[str, Any], committed: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (committed value, current value)`` for every value that differs (new keys: old is None)."""
    return {k: (committed.get(k), v) for k, v in current.items() if k not in committed or not _same(committed[k], v)}


def recipe_of(current: dict[str, Any], root: Path) -> str:
    """The preset (``presets/<name>.yaml``) whose every value the params match, else ``default``.

    When several match, the one that fixes the most values wins (the most specific recipe).
    """
    best, best_size = DEFAULT, 0
    for path in sorted((root / PRESETS_DIR).glob("*.yaml")):
        try:
            values = recipe_overrides(root, path.stem)
        except (CompareError, yaml.YAMLError, OSError):
            continue
        if values and len(values) > best_size and all(k in current and _same(current[k], v) for k, v in values.items()):
            best, best_size = path.stem, len(values)
    return best


def describe_run(
    current: dict[str, Any],
    where: Path,
    root: Path,
    stage: str,
    experiment: dict[str, str] | None = None,
    data: dict[str, str] | None = None,
) -> str:
    """The run's description (markdown): recipe, DVC experiment, params changed from the commit, code, data.

    current: ``Params.flat()``; where: the working copy the stage runs in (a DVC temporary copy
    for ``dvc exp run --temp``); root: the repository that holds ``presets/``; experiment: the
    ``dvc.exp_*`` tags; data: ``{"source": ..., "train": md5, "test": md5}``.
    """
    recipe = recipe_of(current, root)
    recipe_text = (
        f"`{recipe}` (`{PRESETS_DIR}/{recipe}.yaml`: every value of the preset matches)"
        if recipe != DEFAULT
        else f"`{DEFAULT}` ({PARAMS_FILE}; no preset of `{PRESETS_DIR}/` matches every value)"
    )
    name = (experiment or {}).get("dvc.exp_name")
    committed = committed_params(where)
    changes = param_changes(current, committed) if committed is not None else None
    items = sorted((changes or {}).items())
    changed_md = ", ".join(
        f"`{k}` {_text(old)} → {_text(new)}" if old is not None else f"`{k}` = {_text(new)} (new)"
        for k, (old, new) in items
    )
    changed_plain = ", ".join(
        f"{k} {'(new)' if old is None else _text(old)} → {_text(new)}" for k, (old, new) in items
    )
    # The first line is what the runs table's Description column shows: plain text, no markdown.
    summary = [f"{recipe} recipe", f"DVC experiment {name}" if name else "dvc repro"]
    if changes is not None:
        summary.append(f"changed: {changed_plain}" if changes else "params as committed")
    lines = [" · ".join(summary), "", f"Trained by the DVC stage `{stage}` (`python -m pipeline {stage}`).", ""]
    lines.append(f"- **Recipe:** {recipe_text}")
    if name:
        base = (experiment or {}).get("dvc.exp_baseline_rev", "")
        lines.append(
            f"- **DVC experiment:** `{name}`"
            + (f" from baseline commit `{base[:7]}`" if base else "")
            + f" (`dvc exp apply {name}` brings it into a workspace)"
        )
    else:
        lines.append("- **DVC experiment:** none (`dvc repro` in the workspace)")
    if changes is None:
        lines.append(f"- **Params changed from the commit:** unknown ({PARAMS_FILE} is not committed)")
    else:
        lines.append(f"- **Params changed from the commit's {PARAMS_FILE}:** {changed_md or 'none'}")
    commit = git(where, "rev-parse", "HEAD")
    if commit:
        lines.append(f"- **Code:** commit `{commit[:12]}`")
    if data:
        lines.append(f"- **Data:** `{data['source']}`, DVC md5 train `{data['train']}`, test `{data['test']}`")
    return "\n".join(lines) + "\n"
