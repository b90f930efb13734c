"""Prefect orchestration of the DVC pipeline. The only module that imports prefect.

The flow ``ebm-pipeline`` runs the DVC stages in order, each as one Prefect task that calls
``dvc repro --single-item <stage>`` in a subprocess, so a flow run leaves exactly what
``dvc repro`` leaves (same outputs, same dvc.lock) and DVC, not Prefect, decides whether a
stage re-runs. Each task reports what DVC did: ``ran``, ``skipped`` (unchanged) or
``restored`` (outputs checked out from DVC's run-cache).

With overrides (``{"train.alpha": 0.2}``) the run is a DVC experiment instead:
``dvc exp run --temp -S train.alpha=0.2``, one task, in a copy of the workspace under
``.dvc/tmp/exps``; params.yaml and the outputs in the workspace stay as they are, and the
result is listed by ``dvc exp show`` (``dvc exp apply <name>`` brings it into the workspace).

The stage ``register`` (after ``evaluate``) puts the model through the registry's FID gate, so the nightly
deployment is a continuous-training loop: the flow's markdown artifact opens with whether the
night's model was promoted to ``champion`` (what ``make serve-model`` serves), and why.

No ML here: the stages are ``python -m pipeline <stage>`` commands run by DVC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# No network may be available: keep Prefect's (and DVC's) usage reporting off unless set otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.stages import STAGES  # noqa: E402
from pipeline.config import ConfigError, Params, load_params  # noqa: E402
from pipeline.experiments import (  # noqa: E402
    check_overrides,
    command_env,
    experiment_copy_paths,
    exp_run_args,
    experiment_results,
    git_index_kept,
    json_at,
    parse_set,
)

FLOW_NAME = "ebm-pipeline"
ARTIFACT_KEY = "ebm-pipeline-report"
PREFECT_FILE = "prefect.yaml"
PARAMS_FILE = "params.yaml"  # what the DVC stages read
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY = 10.0
TAIL_LINES = 20  # stderr lines of a failed DVC command kept for the error message
INTERRUPT_GRACE_S = 30.0  # time a stage gets to checkpoint after SIGINT when the flow is stopped

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")
_EXP_NAME = re.compile(r"Ran experiment\(s\): (\S+)")
STATUS_TEXT = {
    "ran": "ran",
    "skipped": "skipped (unchanged)",
    "restored": "restored from the run-cache",
    "unknown": "no DVC report",
}


class StageFailed(RuntimeError):
    """A DVC command failed; the message ends with the tail of its stderr."""


# ------------------------------------------------------------------ overrides


# ------------------------------------------------------------------ running DVC


@dataclass
class CommandResult:
    returncode: int
    lines: list[str] = field(default_factory=list)  # stdout and stderr, in arrival order
    stderr_tail: list[str] = field(default_factory=list)


def run_command(args: list[str], cwd: str | Path, on_line: Callable[[str], None] | None = None) -> CommandResult:
    """Run a command, passing each output line to ``on_line`` as it arrives.

    If the caller is interrupted (Ctrl-C, flow cancelled), the command's process group gets
    SIGINT, so a training stage can write its checkpoint, then SIGKILL after a grace period.
    """
    posix = os.name == "posix"
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=posix,
    )
    lines: queue.Queue = queue.Queue()

    def pump(stream, is_err: bool) -> None:
        for line in stream:
            lines.put((is_err, line.rstrip("\r\n")))
        lines.put(None)

    for stream, is_err in ((proc.stdout, False), (proc.stderr, True)):
        threading.Thread(target=pump, args=(stream, is_err), daemon=True).start()
    result = CommandResult(returncode=-1)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    open_streams = 2

    def take(timeout: float | None = None) -> None:
        nonlocal open_streams
        item = lines.get(timeout=timeout)
        if item is None:
            open_streams -= 1
            return
        is_err, line = item
        result.lines.append(line)
        if is_err and line.strip():
            tail.append(line)
        if on_line is not None and line.strip():
            on_line(line)

    try:
        while open_streams:
            take()
        result.returncode = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc, posix)
            # What the command said while stopping (a training stage: "checkpoint saved") still reaches the log.
            deadline = time.monotonic() + INTERRUPT_GRACE_S
            with contextlib.suppress(Exception):  # queue.Empty, or a logger gone: the interrupt is what matters
                while open_streams and time.monotonic() < deadline:
                    take(timeout=max(0.0, deadline - time.monotonic()))
    result.stderr_tail = list(tail)
    return result


def _stop(proc: subprocess.Popen, posix: bool) -> None:
    try:
        if posix:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.terminate()
        proc.wait(timeout=INTERRUPT_GRACE_S)
    except subprocess.TimeoutExpired:
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def run_dvc(args: list[str], cwd: str | Path, on_line: Callable[[str], None] | None = None) -> CommandResult:
    """``dvc <args>`` with this interpreter, in ``cwd``. Resolved at call time, so tests can patch it."""
    return run_command([sys.executable, "-m", "dvc", *args], cwd, on_line)


def stage_statuses(lines: list[str]) -> dict[str, str]:
    """What DVC did with each stage, from its output: ran, skipped or restored."""
    out: dict[str, str] = {}
    for line in lines:
        for pattern, status in ((_RAN, "ran"), (_SKIPPED, "skipped"), (_RESTORED, "restored")):
            m = pattern.search(line)
            if m:
                out[m.group(1)] = status
    return out


def _failure(what: str, args: list[str], result: CommandResult) -> StageFailed:
    tail = "\n".join(result.stderr_tail) or "(no output on stderr)"
    return StageFailed(f"{what} failed: dvc {' '.join(args)} exited with {result.returncode}\n{tail}")


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, repo_dir: str) -> str:
    """``dvc repro --single-item <stage>``; returns ran, skipped, restored (or unknown)."""
    logger = get_run_logger()
    args = ["repro", "--single-item", stage]
    result = run_dvc(args, repo_dir, logger.info)
    if result.returncode != 0:
        exc = _failure(f"stage {stage}", args, result)
        logger.error("%s", exc)
        raise exc
    status = stage_statuses(result.lines).get(stage, "unknown")
    logger.info("stage %s: %s", stage, STATUS_TEXT[status])
    return status


@task(name="dvc-exp-run", cache_policy=NO_CACHE)
def run_experiment(repo_dir: str, set_args: list[str], name: str | None, copy_paths: list[str]) -> dict[str, Any]:
    """``dvc exp run --temp -S k=v ...`` (all stages); returns the experiment's name and stage statuses."""
    logger = get_run_logger()
    args = exp_run_args(name, set_args, copy_paths)
    with git_index_kept(Path(repo_dir), logger.warning):
        result = run_dvc(args, repo_dir, logger.info)
    if result.returncode != 0:
        exc = _failure("experiment", args, result)
        logger.error("%s", exc)
        raise exc
    statuses = stage_statuses(result.lines)
    for stage in STAGES:
        logger.info("stage %s: %s", stage, STATUS_TEXT[statuses.get(stage, "unknown")])
    found = [m.group(1) for m in map(_EXP_NAME.search, result.lines) if m]
    return {"name": found[-1] if found else name, "stages": statuses}


# ------------------------------------------------------------------ the report


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix[:-1], obj)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def workspace_results(repo: Path, params: Params) -> tuple[dict[str, Any], str | None]:
    """Metrics files (in the order the stages wrote them) and the MLflow run id, from the workspace."""
    metrics: dict[str, Any] = {}
    mdir = repo / params.paths.metrics_dir
    files = sorted(mdir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if mdir.is_dir() else []
    for path in files:
        try:
            metrics[Path(params.paths.metrics_dir, path.name).as_posix()] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            metrics[path.name] = {"error": str(exc)}
    run_id = None
    info = repo / params.paths.run_info
    if info.is_file():
        try:
            run_id = json.loads(info.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            run_id = None
    return metrics, run_id


def registry_outcome(repo: Path, params: Params, rev: str | None = None) -> dict[str, Any] | None:
    """What the register stage decided (``paths.registry_info``), in the workspace or in commit ``rev``."""
    rel = Path(params.paths.registry_info)
    if rev is not None:
        return json_at(repo, rev, rel.as_posix()) or None
    try:
        data = json.loads((repo / rel).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def registry_markdown(outcome: dict[str, Any] | None, ran: bool) -> list[str]:
    """Whether this run's model was promoted, and why (the gate's reason, with both FIDs).

    ``ran``: whether the register stage ran in this flow run; if DVC skipped it, no new model
    came through the gate and the record is the previous decision.
    """
    lines = ["## Model registry", ""]
    if not outcome:
        return lines + ["No registry record (the register stage has not run).", ""]
    if not outcome.get("registered"):
        return lines + [f"**Not registered**: {outcome.get('reason', 'no reason recorded')}.", ""]
    name, version = outcome.get("model_name"), outcome.get("version")
    if not ran:
        head = (
            f"**No new model**: the register stage did not run (nothing changed). "
            f"Last decision: `{name}` version {version} is the `{outcome.get('alias')}`."
        )
    elif outcome.get("already_champion"):
        head = f"**Champion kept**: `{name}` version {version} already was the `champion` (the same trained model)."
    elif outcome.get("promoted"):
        head = (
            f"**Promoted**: `{name}` version {version} is the new `champion` "
            f"(`models:/{name}@champion`, what is served)."
        )
    else:
        held = outcome.get("champion_before") or {}
        stays = f"; `champion` stays on version {held['version']}" if held.get("version") else ""
        head = f"**Not promoted**: `{name}` version {version} is the `challenger`{stays}."
    return lines + [head, "", f"Why: {outcome.get('reason', 'no reason recorded')}.", ""]


def report_markdown(
    stages: dict[str, str],
    metrics: dict[str, Any],
    run_id: str | None,
    experiment: dict[str, Any] | None = None,
    registry: dict[str, Any] | None = None,
) -> str:
    lines = [f"# {FLOW_NAME}", ""]
    if experiment:
        sets = ", ".join(f"`{s}`" for s in experiment["set"])
        lines += [
            (
                f"DVC experiment **{experiment['name']}** (`dvc exp run --temp`, {sets}); "
                f"`dvc exp show` lists it, `dvc exp apply {experiment['name']}` brings it into the workspace."
            ),
            "",
        ]
    else:
        lines += ["`dvc repro` of the workspace, one stage per task.", ""]
    if run_id:
        lines += [f"MLflow run id: `{run_id}`", ""]
    elif experiment:
        lines += ["MLflow run id: not in the experiment commit (the run-info file is git-ignored).", ""]
    else:
        lines += ["MLflow run id: none (no run-info file).", ""]
    lines += registry_markdown(registry, ran=stages.get("register") == "ran")
    lines += ["## Stages", "", "| Stage | DVC |", "|---|---|"]
    lines += [f"| {s} | {STATUS_TEXT[stages.get(s, 'unknown')]} |" for s in STAGES]
    lines += ["", "## Metrics", ""]
    rows = []
    for path, data in metrics.items():
        if isinstance(data, dict) and set(data) == {"error"}:
            rows.append(f"| {path} | (unreadable) | {data['error']} |")
            continue
        rows += [f"| {path} | {key} | {_fmt(value)} |" for key, value in _flatten(data)]
    if rows:
        lines += ["| File | Metric | Value |", "|---|---|---|", *rows]
    else:
        lines += ["No metrics found."]
    return "\n".join(lines) + "\n"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(repo_dir: str, params: Params, stages: dict[str, str], experiment: dict[str, Any] | None) -> dict:
    """A markdown artifact: whether the model was promoted and why, the stage outcomes, the metrics, the MLflow run."""
    repo = Path(repo_dir)
    if experiment:
        metrics, run_id, rev = experiment_results(repo, params, experiment["name"])
        experiment = {**experiment, "rev": rev}
        registry = registry_outcome(repo, params, rev) if rev else None
    else:
        metrics, run_id = workspace_results(repo, params)
        registry = registry_outcome(repo, params)
    markdown = report_markdown(stages, metrics, run_id, experiment, registry)
    create_markdown_artifact(
        markdown=markdown, key=ARTIFACT_KEY, description=f"{FLOW_NAME}: promoted or not, metrics and MLflow run"
    )
    return {"metrics": metrics, "run_id": run_id, "registry": registry, "markdown": markdown}


# ------------------------------------------------------------------ the flow


@flow(name=FLOW_NAME, description="The DVC pipeline (prepare -> register), each stage run through DVC.")
def ebm_pipeline(
    overrides: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY,
    experiment_name: str | None = None,
    repo_dir: str = ".",
) -> dict[str, Any]:
    """Run every DVC stage in order; with ``overrides`` run them as one DVC experiment.

    overrides: ``{"section.key": value}``, e.g. ``{"train.alpha": 0.2}``; validated before
        anything runs. Given, the run is ``dvc exp run --temp -S ...``; params.yaml is not touched.
    retries, retry_delay_seconds: how often, and after how long, a failed stage is retried.
    experiment_name: the DVC experiment's name (with overrides; DVC picks one if empty).
    repo_dir: the DVC repository (default: the working directory).
    """
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    params, set_args = check_overrides(load_params(repo / PARAMS_FILE), overrides or {})
    if retries < 0 or retry_delay_seconds < 0:
        raise ValueError(f"retries ({retries}) and retry_delay_seconds ({retry_delay_seconds}) must be >= 0")
    options = {"retries": retries, "retry_delay_seconds": retry_delay_seconds}
    experiment = None
    if set_args:
        copy_paths = experiment_copy_paths(repo, params)
        logger.info("overrides %s: running a DVC experiment (workspace params.yaml unchanged)", ", ".join(set_args))
        done = run_experiment.with_options(**options)(str(repo), set_args, experiment_name, copy_paths)
        stages = done["stages"]
        experiment = {"name": done["name"], "set": set_args}
    else:
        stages = {stage: run_stage.with_options(**options)(stage, str(repo)) for stage in STAGES}
    report = publish_report(str(repo), params, stages, experiment)
    return {
        "stages": stages,
        "experiment": experiment,
        "run_id": report["run_id"],
        "metrics": report["metrics"],
        "registry": report["registry"],
    }


# ------------------------------------------------------------------ deployment


def deployment_spec(repo: str | Path = ".", name: str | None = None) -> dict[str, Any]:
    """The deployment declared in prefect.yaml: name, cron, timezone, parameters, ..."""
    path = Path(repo) / PREFECT_FILE
    config = yaml.safe_load(path.read_text()) or {}
    entries = [d for d in config.get("deployments") or [] if str(d.get("entrypoint", "")).endswith(":ebm_pipeline")]
    if name:
        entries = [d for d in entries if d.get("name") == name]
    if not entries:
        raise ConfigError(f"prefect: no deployment{' ' + repr(name) if name else ''} of ebm_pipeline in {path}")
    entry = entries[0]
    crons = [s for s in entry.get("schedules") or [] if s.get("cron")]
    return {
        "name": entry["name"],
        "cron": crons[0]["cron"] if crons else None,
        "timezone": crons[0].get("timezone") if crons else None,
        "parameters": entry.get("parameters") or {},
        "description": entry.get("description"),
        "tags": entry.get("tags") or [],
        "concurrency_limit": entry.get("concurrency_limit"),
        "work_pool": (entry.get("work_pool") or {}).get("name"),
    }


def build_deployment(repo: str | Path = ".", name: str | None = None, cron: str | None = None):
    """The prefect.yaml deployment as a runner deployment of this flow (what ``--serve`` serves)."""
    from prefect.schedules import Cron

    spec = deployment_spec(repo, name)
    cron = cron or spec["cron"]
    return ebm_pipeline.to_deployment(
        name=spec["name"],
        schedules=[Cron(cron, timezone=spec["timezone"])] if cron else None,
        parameters=spec["parameters"],
        description=spec["description"],
        tags=spec["tags"],
        concurrency_limit=spec["concurrency_limit"],
    )


def serve(repo: str | Path = ".", name: str | None = None, cron: str | None = None) -> None:
    """Register the deployment and run its scheduled flow runs in this process until stopped."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(repo, name, cron))


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None, params_path: str = PARAMS_FILE) -> int:
    """``python -m pipeline flow [--set KEY=VALUE ...] [--retries N] [--retry-delay S] [--serve]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline flow",
        description="Run the DVC pipeline once as the Prefect flow 'ebm-pipeline', or serve its schedule.",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param (repeatable); the run becomes a DVC experiment",
    )
    parser.add_argument("--name", help="the DVC experiment's name (with --set)")
    parser.add_argument(
        "--retries", type=int, default=DEFAULT_RETRIES, help=f"retries of a failed stage (default {DEFAULT_RETRIES})"
    )
    parser.add_argument(
        "--retry-delay",
        type=float,
        default=DEFAULT_RETRY_DELAY,
        help=f"seconds between retries (default {DEFAULT_RETRY_DELAY:g})",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help=f"serve the deployment of {PREFECT_FILE} on its schedule instead of running once",
    )
    parser.add_argument("--deployment", help=f"with --serve: which deployment of {PREFECT_FILE} (default: the first)")
    parser.add_argument("--cron", help=f"with --serve: a cron schedule instead of the one in {PREFECT_FILE}")
    args = parser.parse_args(argv)

    if Path(params_path).resolve() != Path(PARAMS_FILE).resolve():
        print(f"flow: the DVC stages read {PARAMS_FILE}; --params is not supported with flow", file=sys.stderr)
        return 2
    try:
        if args.retries < 0 or args.retry_delay < 0:
            raise ConfigError("flow: --retries and --retry-delay must be >= 0")
        overrides = parse_set(args.overrides)
        check_overrides(load_params(params_path), overrides)
        if args.serve:
            if overrides or args.name:
                raise ConfigError(f"flow: --serve takes its parameters from {PREFECT_FILE}, not --set/--name")
            deployment_spec(".", args.deployment)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.serve:
        serve(".", args.deployment, args.cron)
        return 0

    started = time.monotonic()
    state = ebm_pipeline(
        overrides=overrides or None,
        retries=args.retries,
        retry_delay_seconds=args.retry_delay,
        experiment_name=args.name,
        repo_dir=".",
        return_state=True,
    )
    if not state.is_completed():
        try:
            state.result()
        except Exception as exc:  # noqa: BLE001 - the flow's own exception: failed stage and stderr tail
            print(f"flow: {exc}", file=sys.stderr)
        else:
            print(f"flow: {state.name}: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()
    outcome = ", ".join(f"{s} {summary['stages'].get(s, 'unknown')}" for s in STAGES)
    where = f"experiment {summary['experiment']['name']}" if summary["experiment"] else "workspace"
    registry = summary.get("registry") or {}
    verdict = (
        "skipped" if summary["stages"].get("register") != "ran"
        else "kept" if registry.get("already_champion")
        else "promoted" if registry.get("promoted")
        else "not promoted"
    )
    registered = (
        f"; {registry['model_name']} v{registry['version']} {registry['alias']} ({verdict})"
        if registry.get("registered")
        else ""
    )
    print(
        f"flow: {where}: {outcome} ({time.monotonic() - started:.0f}s); "
        f"MLflow run {summary['run_id'] or '-'}{registered}"
    )
    return 0
