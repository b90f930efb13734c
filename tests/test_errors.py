"""Every user error is one line and an exit code, before any work, with nothing half-written.

Exit code 2 for what the params ask and the machine cannot give (a bad value, an absent device),
1 for data, files and servers. Most cases call the entry point in this process (``main``), which
is what ``python -m pipeline`` runs; one runs it as a subprocess, as a user or DVC does.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.__main__ import main
from pipeline.config import RuntimeConfig
from pipeline.data import DataError
from pipeline.runtime import DeviceError, resolve_device
from pipeline.train import steps_per_epoch
from tests.conftest import tiny_params_dict, write_params


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_absent_cuda_stops_train_with_exit_2_in_one_line_and_writes_nothing(tmp_path):
    """runtime.device: cuda where CUDA is hidden (CUDA_VISIBLE_DEVICES=""), so the same on a GPU host."""
    write_params(tmp_path / "params.yaml", {"runtime": {"device": "cuda"}})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runtime: runtime.device=cuda but this machine has no usable CUDA")
    assert "runtime.device: auto" in lines[0]
    assert _files(tmp_path) == ["params.yaml"]  # no data read, no store, no checkpoint


@pytest.mark.parametrize("stage", ["train_classifier", "train", "generate", "evaluate"])
def test_absent_mps_stops_every_stage_that_computes_with_exit_2(stage, tmp_path, monkeypatch, new_mlflow_uri, capsys):
    if torch.backends.mps.is_available():  # a Mac with an Apple GPU: hide it
        importlib.import_module("torch._dynamo")  # it keeps a reference to the real function: load it first

        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    write_params(tmp_path / "params.yaml", {"runtime": {"device": "mps"}})
    monkeypatch.chdir(tmp_path)
    assert main([stage]) == 2
    line = _one_line(capsys)
    assert line.startswith("runtime: runtime.device=mps but MPS") and "runtime.device: auto" in line
    assert _files(tmp_path) == ["params.yaml"]


def test_resolve_device_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^runtime: runtime.device=cuda:1 but this machine has no usable CUDA"):
        resolve_device(RuntimeConfig(device="cuda:1"))
    assert resolve_device(RuntimeConfig(device="auto")).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"cuda:5 but this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device(RuntimeConfig(device="cuda:5"))
    assert resolve_device(RuntimeConfig(device="cuda:1")) == torch.device("cuda", 1)


def test_too_few_images_for_one_batch_per_process_is_a_data_error():
    assert steps_per_epoch(64, 1, 16) == 4 and steps_per_epoch(64, 2, 16) == 2
    with pytest.raises(DataError) as info:
        steps_per_epoch(30, 2, 16)
    message = str(info.value)
    assert "\n" not in message and "30 training images over 2 process(es)" in message
    assert "train.batch_size=16" in message and "lower train.batch_size" in message


def test_train_with_too_few_images_exits_1_before_the_store_or_a_checkpoint(tmp_path, monkeypatch, new_mlflow_uri, capsys):
    write_params(tmp_path / "params.yaml", {"data": {"limit": 10}})  # 10 images, batches of 16
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 0
    capsys.readouterr()
    before = _files(tmp_path)
    assert main(["train"]) == 1
    line = _one_line(capsys)
    assert line.startswith("train: 10 training images over 1 process(es) are fewer than one batch")
    assert _files(tmp_path) == before  # no mlflow.db, no models/
    assert not Path(new_mlflow_uri.removeprefix("sqlite:///")).exists()


@pytest.mark.parametrize(
    "stage, needle",
    [
        ("train_classifier", "run the prepare stage first"),
        ("train", "run the prepare stage first"),
        ("generate", "models/ebm.pt not found; run the train stage first"),
        ("evaluate", "models/ebm.pt not found; run the train stage first"),
    ],
)
def test_a_missing_input_is_one_line_exit_1(stage, needle, tmp_path, monkeypatch, new_mlflow_uri, capsys):
    write_params(tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main([stage]) == 1
    assert needle in _one_line(capsys)
    assert _files(tmp_path) == ["params.yaml"]


def test_a_broken_run_info_file_is_one_line_exit_1(tmp_path, monkeypatch, new_mlflow_uri, capsys):
    from pipeline.checkpoint import MODEL_FORMAT, atomic_save
    from pipeline.model import EnergyNet

    write_params(tmp_path / "params.yaml", {"generate": {"snapshots": 1}})  # the final weights: no snapshots needed
    monkeypatch.chdir(tmp_path)
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "model": EnergyNet().state_dict(),
            "model_config": {"channels": [16, 32, 64, 64], "hidden": 64},
        },
        tmp_path / "models" / "ebm.pt",
    )
    (tmp_path / "models" / "run.json").write_text('{"run_id": ')  # cut short
    assert main(["generate"]) == 1
    line = _one_line(capsys)
    assert line.startswith("tracking: models/run.json is not a run-info file") and "run the train stage again" in line
    assert not (tmp_path / "samples").exists()


def test_interrupt_and_unwritable_files_are_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.stages import prepare

    write_params(tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)

    def interrupted(params):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "run", interrupted)
    assert main(["prepare"]) == 130
    assert _one_line(capsys) == "prepare: interrupted (SIGINT); run it again to redo it"

    def unwritable(params):
        raise PermissionError(13, "Permission denied", "data/prepared/train.pt")

    monkeypatch.setattr(prepare, "run", unwritable)
    assert main(["prepare"]) == 1
    assert _one_line(capsys) == "prepare: [Errno 13] Permission denied: 'data/prepared/train.pt'"


def test_bad_progress_interval_is_a_params_error(tmp_path, capsys):
    raw = tiny_params_dict({"runtime": {"progress_seconds": -5}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--params", str(tmp_path / "params.yaml")]) == 2
    assert _one_line(capsys).startswith("params: runtime.progress_seconds=-5.0 is invalid")
