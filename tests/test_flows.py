"""Issue 4: orchestration with Prefect (pipeline/flows.py, prefect.yaml).

One Prefect test server for the session (``prefect_test_harness``). The real pipeline runs
once, on the tiny configuration, in one test that then checks everything that needs its
outputs: the same outputs and dvc.lock as ``dvc repro``, a second run that DVC skips
entirely, the report artifact, and an override run recorded as a DVC experiment. Retries
and failures run a repository of cheap fake stages through the real DVC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.stages import STAGES
from tests.conftest import ROOT, run, write_params

FAKE_STAGE = """\
import os
import sys
from pathlib import Path

stage = sys.argv[1]
state = Path(os.environ["FAKE_STATE"])
with open(state / "calls.log", "a") as fh:
    fh.write(stage + "\\n")
if stage == os.environ.get("FAKE_FAIL_ALWAYS"):
    sys.exit(f"fake {stage}: disk on fire")
marker = state / f"{stage}.failed"
if stage == os.environ.get("FAKE_FAIL_ONCE") and not marker.exists():
    marker.touch()
    sys.exit(f"fake {stage}: database is locked")
print(f"fake {stage}: ok")
"""


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API (SQLite in a temporary directory) for every flow run here."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fake_repo(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A git + DVC repository whose stages are a cheap script; returns (repo, state dir)."""
    repo = tmp_path / "fake"
    state = tmp_path / "state"
    repo.mkdir()
    state.mkdir()
    write_params(repo / "params.yaml")
    (repo / "fake_stage.py").write_text(FAKE_STAGE)
    stages = {name: {"cmd": f"python fake_stage.py {name}"} for name in STAGES}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    monkeypatch.setenv("FAKE_STATE", str(state))
    for var in ("FAKE_FAIL_ONCE", "FAKE_FAIL_ALWAYS"):
        monkeypatch.delenv(var, raising=False)
    return repo, state


def calls(state: Path) -> list[str]:
    log = state / "calls.log"
    return log.read_text().split() if log.is_file() else []


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def latest_report() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from pipeline.flows import ARTIFACT_KEY

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert found, "no report artifact"
    return found[0].data


def flow_run_logs(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return "\n".join(f"{logging.getLevelName(log.level)} {log.message}" for log in logs)


# ------------------------------------------------------------------ overrides (no Prefect run)


def test_overrides_are_validated_and_written_as_dvc_reads_them(tmp_path):
    from pipeline.flows import check_overrides, parse_set

    params = load_params(write_params(tmp_path / "params.yaml"))
    given = parse_set(["train.lr=1e-4", "generate.chain_steps=[0,2]", "runtime.device=cpu", "tracking.enabled=false"])
    new, set_args = check_overrides(params, given)
    assert new.train.lr == 1e-4 and new.generate.chain_steps == (0, 2) and new.tracking.enabled is False
    assert set_args == [
        "train.lr=0.0001",
        "generate.chain_steps=[0, 2]",
        "runtime.device=cpu",
        "tracking.enabled=false",
    ]
    assert check_overrides(params, {"train.alpha": 0.2})[1] == ["train.alpha=0.2"]  # typed, as from the UI
    with pytest.raises(ConfigError, match=r"^params: unknown key train\.nope$"):
        check_overrides(params, {"train.nope": 1})
    with pytest.raises(ConfigError, match=r"^params: train\.alpha=-1(\.0)? is invalid"):
        check_overrides(params, parse_set(["train.alpha=-1"]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["train.alpha"])


def test_cli_rejects_a_bad_override_in_one_line(tmp_path, monkeypatch, capsys):
    from pipeline import flows

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    monkeypatch.setattr(flows, "ebm_pipeline", lambda **kw: pytest.fail("the flow must not start"))
    assert flows.main(["--set", "train.alpha=0.2", "--set", "train.nope=1"]) == 2
    assert capsys.readouterr().err == "params: unknown key train.nope\n"
    assert flows.main(["--set", "data.source=emnist"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------------ the real pipeline


@pytest.mark.slow
def test_flow_runs_the_dvc_stages_like_dvc_repro(prefect_server, repo_copy):
    from pipeline import flows

    first = flows.ebm_pipeline(repo_dir=str(repo_copy), retries=0)
    assert first["stages"] == dict.fromkeys(STAGES, "ran")
    first_report = latest_report()

    # What dvc repro would leave: the lock matches the files, and dvc repro has nothing to do.
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo_copy).stdout
    lock_text = (repo_copy / "dvc.lock").read_text()
    lock = yaml.safe_load(lock_text)
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    assert {s for s in lock["stages"]} == set(STAGES)
    for out in outs:
        path = repo_copy / out["path"]
        if path.is_file():
            assert md5(path) == out["md5"], out["path"]
    repro = run(["dvc", "repro"], repo_copy).stdout
    assert "Running stage" not in repro
    assert all(f"Stage '{s}' didn't change, skipping" in repro for s in STAGES)
    assert (repo_copy / "dvc.lock").read_text() == lock_text

    # A second flow run: DVC skips every stage.
    second = flows.ebm_pipeline(repo_dir=str(repo_copy), retries=0)
    assert second["stages"] == dict.fromkeys(STAGES, "skipped")
    assert (repo_copy / "dvc.lock").read_text() == lock_text

    # The report: metrics of every stage that writes some, and the MLflow run id.
    params = load_params(repo_copy / "params.yaml")
    run_id = json.loads((repo_copy / params.paths.run_info).read_text())["run_id"]
    assert second["run_id"] == run_id
    report = latest_report()
    assert f"`{run_id}`" in report
    for name in ("classifier", "train", "generate", "evaluate"):
        assert f"| {params.paths.metrics_dir}/{name}.json |" in report
    fid = json.loads((repo_copy / params.paths.metrics_dir / "evaluate.json").read_text())["fid"]
    assert f"| {params.paths.metrics_dir}/evaluate.json | fid | {fid:.6g} |" in report
    # Whether the night's model was promoted, and why: the first run registered v1 as champion,
    # the second (everything skipped) brought no new model.
    assert first["registry"]["version"] == "1" and first["registry"]["promoted"]
    assert "## Model registry" in first_report and "**Promoted**: `ebm-mnist` version 1" in first_report
    assert f"Why: {first['registry']['reason']}." in first_report
    assert "**No new model**" in report and "version 1 is the `champion`" in report

    # Overrides: a DVC experiment from the workspace; params.yaml and the workspace stay as they are.
    params_text = (repo_copy / "params.yaml").read_text()
    status_before = run(["git", "status", "--porcelain"], repo_copy).stdout
    exp = flows.ebm_pipeline(
        repo_dir=str(repo_copy), overrides={"evaluate.confidence": 0.5}, experiment_name="conf-05", retries=0
    )
    assert exp["experiment"] == {"name": "conf-05", "set": ["evaluate.confidence=0.5"]}
    # nothing upstream re-runs; register runs only if evaluate's metrics changed (checked below)
    assert set(exp["stages"]) == set(STAGES)
    assert {k: v for k, v in exp["stages"].items() if k != "register"} == {
        **dict.fromkeys(set(STAGES) - {"register"}, "skipped"), "evaluate": "ran"
    }
    assert (repo_copy / "params.yaml").read_text() == params_text
    assert (repo_copy / "dvc.lock").read_text() == lock_text
    assert run(["git", "status", "--porcelain"], repo_copy).stdout == status_before
    assert not list((repo_copy / ".dvc" / "tmp" / "exps").glob("*/tmp*")), "temporary experiment copy left behind"

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo_copy).stdout)
    revs = [r for b in shown for e in b.get("experiments") or [] for r in e["revs"] if r["name"] == "conf-05"]
    assert len(revs) == 1
    data = revs[0]["data"]
    assert data["params"]["params.yaml"]["data"]["evaluate"]["confidence"] == 0.5
    evaluate_json = f"{params.paths.metrics_dir}/evaluate.json"
    assert "fid" in data["metrics"][evaluate_json]["data"], "experiment metrics not reachable by dvc exp show"
    committed = json.loads(run(["git", "show", f"{revs[0]['rev']}:{evaluate_json}"], repo_copy).stdout)
    assert exp["metrics"][evaluate_json] == committed  # the flow reads the experiment's own commit
    assert all(committed[k] == v for k, v in data["metrics"][evaluate_json]["data"].items())  # as dvc exp show
    assert exp["run_id"] == run_id  # train did not re-run: the experiment's model is the baseline's
    exp_report = latest_report()
    assert "conf-05" in exp_report
    # The same trained model: no new version, whether register re-ran (new metrics) or was skipped.
    changed = committed != json.loads((repo_copy / evaluate_json).read_text())
    assert exp["stages"]["register"] == ("ran" if changed else "skipped")
    assert exp["registry"]["version"] == "1" and exp["registry"]["alias"] == "champion"
    assert ("**Champion kept**" if changed else "**No new model**") in exp_report


# ------------------------------------------------------------------ retries and failures


@pytest.mark.slow
def test_transient_failure_is_retried(prefect_server, fake_repo, monkeypatch):
    from pipeline import flows

    repo, state = fake_repo
    monkeypatch.setenv("FAKE_FAIL_ONCE", "train")
    summary = flows.ebm_pipeline(repo_dir=str(repo), retries=1, retry_delay_seconds=0)
    assert STAGES[:3] == ("prepare", "train_classifier", "train")
    assert calls(state) == [*STAGES[:3], "train", *STAGES[3:]]  # every stage once, train twice (retried)
    assert summary["stages"] == dict.fromkeys(STAGES, "ran")


@pytest.mark.slow
def test_persistent_failure_fails_the_flow_with_the_stage_message(prefect_server, fake_repo, monkeypatch):
    from pipeline import flows

    repo, state = fake_repo
    monkeypatch.setenv("FAKE_FAIL_ALWAYS", "generate")
    flow_state = flows.ebm_pipeline(repo_dir=str(repo), retries=2, retry_delay_seconds=0, return_state=True)
    assert flow_state.is_failed()
    assert calls(state) == ["prepare", "train_classifier", "train", "generate", "generate", "generate"]
    exc = flow_state.result(raise_on_failure=False)
    assert isinstance(exc, flows.StageFailed)
    assert "stage generate failed" in str(exc) and "fake generate: disk on fire" in str(exc)
    logs = flow_run_logs(flow_state)
    assert "ERROR stage generate failed" in logs and "fake generate: disk on fire" in logs


@pytest.mark.slow
def test_cli_runs_the_flow_once_and_reports_failures(prefect_server, fake_repo, monkeypatch, capsys):
    from pipeline import flows

    repo, _ = fake_repo
    monkeypatch.chdir(repo)
    assert flows.main(["--retries", "0"]) == 0
    assert "flow: workspace: prepare ran, train_classifier ran, train ran, generate ran, evaluate ran" in (
        capsys.readouterr().out
    )
    monkeypatch.setenv("FAKE_FAIL_ALWAYS", "prepare")
    assert flows.main(["--retries", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flow: stage prepare failed") and "fake prepare: disk on fire" in err


# ------------------------------------------------------------------ the deployment


@pytest.mark.slow
def test_deployment_registers_with_its_cron_schedule(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    from pipeline import flows

    spec = flows.deployment_spec(ROOT)
    assert spec["cron"] == "0 2 * * *"  # nightly
    full_name = f"{flows.FLOW_NAME}/{spec['name']}"

    # What `python -m pipeline flow --serve` (make serve) registers.
    flows.build_deployment(ROOT).apply()
    with get_client(sync_client=True) as client:
        served = client.read_deployment_by_name(full_name)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in served.schedules] == [
            (spec["cron"], spec["timezone"], True)
        ]
        assert served.global_concurrency_limit.limit == spec["concurrency_limit"] == 1
        client.create_work_pool(WorkPoolCreate(name=spec["work_pool"], type="process"))

    # prefect.yaml itself, applied by `prefect deploy` onto its process work pool.
    deploy = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    with get_client(sync_client=True) as client:
        deployed = client.read_deployment_by_name(full_name)
    assert deployed.work_pool_name == spec["work_pool"]
    assert deployed.entrypoint == "pipeline/flows.py:ebm_pipeline"
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployed.schedules] == [(spec["cron"], spec["timezone"])]


# ------------------------------------------------------------------ stopping a flow run


INTERRUPTIBLE = {  # a training long enough to be stopped midway; checkpoints only at the start and on a signal
    "runtime": {"device": "cpu", "progress_seconds": 0},
    "data": {"limit": 128},
    "langevin": {"steps": 10},
    # 8 steps an epoch: 2,400 steps, minutes of work, so that the signal always finds training still running
    # (the flow forwards the stage's lines through Prefect's log, which may lag the stage by a second or two)
    "train": {"epochs": 300, "batch_size": 16, "checkpoint_every": 100_000, "log_every": 5, "sample_every": 0},
    "tracking": {"enabled": False},
}


@pytest.mark.slow
def test_sigint_to_a_flow_run_lets_training_write_its_checkpoint(prefect_server, tmp_path):
    """Ctrl-C on `python -m pipeline flow`: the running stage gets SIGINT, saves, and the flow stops.

    The flow's log shows the stage's progress lines as they come (they are what the test waits
    for); then SIGINT goes to the flow process alone, as a terminal sends it. Training saves a
    checkpoint at the step it reached, which a later run resumes.
    """
    from prefect.settings import PREFECT_API_URL

    from pipeline.__main__ import main
    from pipeline.checkpoint import CHECKPOINT_FORMAT, safe_load

    repo = tmp_path / "repo"
    repo.mkdir()
    write_params(repo / "params.yaml", INTERRUPTIBLE)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert main(["prepare"]) == 0
    finally:
        os.chdir(cwd)
    stages = {name: {"cmd": f"{sys.executable} -c pass"} for name in STAGES}
    stages["train"] = {"cmd": f"{sys.executable} -m pipeline train"}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # As from a terminal: SIGINT at its default disposition. A suite started in the background by a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "flow", "--retries", "0"], cwd=repo, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "train: step 6/2400" in line:  # the stage's progress, in the flow's log, while it runs
                break
        else:
            pytest.fail("no training progress in the flow's output:\n" + "".join(seen[-40:]))
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]
    assert out.rstrip().endswith("flow: interrupted (SIGINT); run it again to redo it") and "Traceback" not in out
    checkpoint = safe_load(repo / "models" / "checkpoints" / "last.pt", CHECKPOINT_FORMAT)
    assert 6 <= checkpoint["step"] < 2400, out[-3000:]
    assert f"train: stopped by SIGINT at step {checkpoint['step']}; checkpoint saved" in out, out[-3000:]
    assert not (repo / "models" / "ebm.pt").exists()
