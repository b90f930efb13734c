"""Issue 17: the model registry's FID gate, the served scoring model, and `make serve-model`.

One module-scoped private MLflow store holds three "trained models" (random networks, each
with its own MLflow run and a chosen FID, what train and evaluate leave behind), registered in
turn by the register stage: the first becomes the champion, a worse one the challenger, a
better one takes the alias. The served champion is then asked to score images on loopback.
The whole pipeline (a repro and two DVC experiments through the gate) is in test_tracking.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline import gate, tracking
from pipeline.checkpoint import MODEL_FORMAT, atomic_save
from pipeline.config import parse_params
from pipeline.evaluate import score_images
from pipeline.model import EnergyNet
from pipeline.stages import register
from pipeline.stages.common import file_md5, load_energy_model, write_json
from tests.conftest import empty_mlflow_store, tiny_params_dict, write_params

NAME = "ebm-mnist"
FIDS = {"first": 100.0, "worse": 120.0, "better": 80.0}  # margin 5: worse -> challenger, better -> champion


# ------------------------------------------------------------------ the gate alone


def test_gate_decides_on_fid_and_margin():
    first = gate.decide("1", 100.0, None, 5.0)
    assert first.promoted and "no champion" in first.reason
    champ = gate.Champion("1", 100.0)
    assert not gate.decide("2", 120.0, champ, 5.0).promoted
    within = gate.decide("2", 97.0, champ, 5.0)  # better, but by less than the margin
    assert within.alias == gate.CHALLENGER and "97" in within.reason and "100" in within.reason
    assert gate.decide("2", 95.0, champ, 5.0).promoted  # exactly the margin is enough
    assert gate.decide("2", 99.0, champ, 0.0).promoted
    assert gate.decide("1", 130.0, champ, 5.0).reason.startswith("already the champion")
    assert gate.decide("2", math.nan, champ, 5.0).alias == gate.CHALLENGER
    assert gate.decide("2", 1.0, gate.Champion("1", None), 5.0).alias == gate.CHALLENGER
    unlike = gate.decide("2", 50.0, gate.Champion("1", 100.0, {"fid_n": "1000.0"}), 5.0, {"fid_n": "24.0"})
    assert unlike.promoted and "fid_n" in unlike.reason


# ------------------------------------------------------------------ three trained models through the stage


def fake_training(params, seed: int, fid: float, keep: Path) -> str:
    """What train and evaluate leave for the register stage: a model file, its MLflow run, evaluate.json."""
    torch.manual_seed(seed)
    model = EnergyNet.from_config(params.model)
    blob = {
        "format": MODEL_FORMAT,
        "model": model.state_dict(),
        "model_config": {"channels": list(params.model.channels), "hidden": params.model.hidden},
    }
    atomic_save(blob, params.paths.model)
    shutil.copy(params.paths.model, keep)
    tracker = tracking.start_run(params.tracking, run_name=f"seed{seed}")
    tracker.log_params(params.flat())
    tracker.log_metrics({"evaluate.fid": fid})
    tracker.close()
    tracking.write_run_info(params.paths.run_info, tracker, params.tracking.experiment)
    write_json({"fid": fid, "fid_n": 24.0}, Path(params.paths.metrics_dir) / "evaluate.json")
    return tracker.run_id


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The three models registered in turn, then the last once more.

    (work dir, store URI, params, {label: (run id, outcome, model copy)}, the re-run's outcome, stdout).
    """
    work = tmp_path_factory.mktemp("registry")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{empty_mlflow_store(work / 'mlflow.db')}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(work)
    write_params(work / "params.yaml")
    params = parse_params(tiny_params_dict())
    Path(params.paths.classifier).parent.mkdir(parents=True, exist_ok=True)
    Path(params.paths.classifier).write_bytes(b"the FID's feature classifier")  # only its md5 is read
    done, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for seed, (label, fid) in enumerate(FIDS.items(), start=1):
            keep = work / f"{label}.pt"
            run_id = fake_training(params, seed, fid, keep)
            outcome = register.run(params)
            done[label] = (run_id, outcome, keep)
        again = register.run(params)  # the stage re-runs for the same model: no new version
    yield work, uri, params, done, again, printed.getvalue()
    mp.undo()


def versions(uri: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {str(mv.version): mv for mv in client.search_model_versions(f"name = '{NAME}'")}


def alias(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(tracking_uri=uri).get_model_version_by_alias(NAME, name).version)


def test_first_version_is_champion_worse_is_challenger_better_takes_the_alias(registry):
    work, uri, params, done, again, _ = registry
    first, worse, better = (done[k][1] for k in FIDS)
    assert (first["version"], first["alias"], first["promoted"]) == ("1", "champion", True)
    assert first["champion_before"] is None
    assert (worse["version"], worse["alias"], worse["promoted"]) == ("2", "challenger", False)
    assert worse["champion_before"] == {"version": "1", "fid": 100.0}
    assert "120" in worse["reason"] and "100" in worse["reason"] and "worse" in worse["reason"]
    assert (better["version"], better["alias"], better["promoted"]) == ("3", "champion", True)
    assert better["champion_before"] == {"version": "1", "fid": 100.0}
    assert "80" in better["reason"] and "100" in better["reason"]
    assert alias(uri, "champion") == "3" and alias(uri, "challenger") == "2"

    # One version per trained model; the re-run decided again on the same version.
    assert sorted(versions(uri)) == ["1", "2", "3"]
    assert (again["version"], again["alias"]) == ("3", "champion") and again["reason"].startswith("already")

    # Each version: its run, the DVC md5 of its model file, its FID and the decision with both FIDs.
    for label, (run_id, outcome, keep) in done.items():
        mv = versions(uri)[outcome["version"]]
        assert mv.run_id == run_id
        assert mv.tags["dvc.model_md5"] == file_md5(keep)
        assert float(mv.tags["fid"]) == FIDS[label]
        latest = again if label == "better" else outcome  # the re-run decided again for v3
        assert (mv.tags["gate.decision"], mv.tags["gate.alias"]) == (latest["reason"], latest["alias"])
    assert versions(uri)["2"].tags["gate.champion_fid"] == "100.0"
    # The run knows its version; the stage's record is the last decision.
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=uri).get_run(done["worse"][0]).data.tags
    assert tags["registry.version"] == f"{NAME} v2" and tags["registry.decision"] == f"challenger: {worse['reason']}"
    assert json.loads((work / params.paths.registry_info).read_text()) == again


def test_stage_prints_one_line_per_decision(registry, capsys):
    printed = [line for line in registry[-1].splitlines() if line.startswith("register:")]
    assert printed == [
        f"register: {NAME} v1 -> champion (promoted): first version with a FID (100): no champion yet",
        f"register: {NAME} v2 -> challenger (not promoted): FID 120 does not beat champion v1's 100 by the margin 5 "
        "(20 worse)",
        f"register: {NAME} v3 -> champion (promoted): FID 80 beats champion v1's 100 by 20 >= margin 5",
        f"register: {NAME} v3 -> champion (kept): already the champion (FID 80)",
    ]
    off = parse_params(tiny_params_dict({"registry": {"enabled": False}}))
    assert register.run(off) == {"registered": False, "reason": "registry.enabled is false"}
    assert capsys.readouterr().out == "register: not registered (registry.enabled is false)\n"


# ------------------------------------------------------------------ serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_champion_answers_on_loopback_with_the_pipelines_scores(registry):
    work, uri, params, done, *_ = registry
    port = free_port()
    # PATH without the virtualenv, as from `make serve-model` in a shell that did not activate it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": os.defpath}
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve-model", "--port", str(port)],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the scoring server did not answer /ping"
                time.sleep(0.5)
        images = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        images[0] = -1.0  # the ends of the range are valid input
        images[1] = 1.0
        status, answer = post(f"{base}/invocations", {"inputs": images.numpy().tolist()})
        assert status == 200, answer
        rows = answer["predictions"]
        champion, _ = load_energy_model(done["better"][2], torch.device("cpu"))  # v3: the champion's file
        expected = score_images(champion, images, torch.device("cpu"))
        assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
        assert [r["energy"] for r in rows] == [-r["score"] for r in rows]

        status, answer = post(f"{base}/invocations", {"inputs": (images * 3).numpy().tolist()})
        assert status == 400 and "[-1, 1]" in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    first_line = server.stdout.read().splitlines()[0]
    assert first_line == f"serve-model: models:/{NAME}@champion (version 3) on {base}/invocations"


def test_serve_model_without_a_champion_is_one_line(registry, tmp_path, monkeypatch, capsys):
    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    cases = {  # store URI, model name -> the one line
        f"sqlite:///{tmp_path / 'mlflow.db'}": "serve-model: no MLflow store at",  # a fresh clone before make run
        registry[1]: "serve-model: no version of nobody has the alias champion",
    }
    for uri, expected in cases.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        write_params(tmp_path / "params.yaml", {"registry": {"model_name": "nobody"}})
        assert main(["serve-model", "--port", str(free_port())]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "mlflow.db").exists()  # no store is created by asking


def test_served_artifact_key_matches_the_registering_side():
    # tracking.py does not import serving.py (loading it sets MLflow's model): the key is written twice.
    text = (Path(tracking.__file__).with_name("serving.py")).read_text()
    assert f'ARTIFACT_KEY = "{tracking.SCORING_ARTIFACT}"' in text


def test_dvc_yaml_declares_the_model_as_a_dvc_artifact():
    from dvc.repo import Repo

    from tests.conftest import ROOT

    params = parse_params(tiny_params_dict())
    with Repo(str(ROOT)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
    model = artifacts[params.registry.model_name]  # the same name in DVC and in MLflow's registry
    assert model.type == "model" and model.path == params.paths.model
    assert model.desc and "mnist" in model.labels


def test_register_without_evaluate_is_one_line(registry, tmp_path, monkeypatch):
    mlflow_uri = registry[1]  # the module's store: nothing gets registered here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
    params = parse_params(tiny_params_dict())
    Path(params.paths.classifier).parent.mkdir(parents=True)
    Path(params.paths.classifier).write_bytes(b"x")
    fake_training(params, 0, 50.0, tmp_path / "m.pt")
    (Path(params.paths.metrics_dir) / "evaluate.json").unlink()
    from pipeline.data import DataError

    with pytest.raises(DataError, match=r"^register: metrics/evaluate.json not found; run the evaluate stage first$"):
        register.run(params)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=mlflow_uri).get_run(tracking.read_run_info(params.paths.run_info))
    assert run.info.status == "FINISHED"  # the training run is not left open
