"""`langevin.precision: auto`: bf16 only where the hardware runs it natively, recorded wherever a run is described."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import runtime
from pipeline.checkpoint import CheckpointError
from pipeline.config import parse_params
from pipeline.langevin import resolve_kernels, score_in_precision
from pipeline.model import EnergyNet
from pipeline.train import Trainer
from pipeline.tracking import NullTracker
from tests.conftest import tiny_params_dict, write_params

CPU = torch.device("cpu")


def _native(monkeypatch, avx512_bf16: bool, amx: bool, onednn: bool = True) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "onednn", "expected"),
    [
        (False, False, False, "fp32"),  # AVX2 only (the AMD kind)
        (False, False, True, "fp32"),  # AVX-512 without BF16: oneDNN would emulate bf16
        (True, False, True, "bf16"),  # AVX512-BF16
        (False, True, True, "bf16"),  # AMX
    ],
)
def test_auto_follows_the_capability_check(monkeypatch, avx512_bf16, amx, onednn, expected):
    _native(monkeypatch, avx512_bf16, amx, onednn)
    assert runtime.resolve_precision("auto", CPU) == expected
    assert runtime.hardware(CPU)["bf16_native"] == str(expected == "bf16").lower()
    # explicit choices stay what they say, whatever the hardware
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    model = EnergyNet()
    assert score_in_precision(model, "auto").precision == expected
    shadow = score_in_precision(model, "auto").shadow
    assert next(shadow.parameters()).dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def _trainer(tmp_path, precision: str) -> Trainer:
    raw = tiny_params_dict({"langevin": {"precision": precision}, "tracking": {"enabled": False}})
    images = torch.rand(48, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Trainer(parse_params(raw), images, CPU, NullTracker(), tmp_path / "ckpt.pt", progress=False)


def test_resume_under_another_resolved_precision_is_refused_in_one_line(tmp_path, monkeypatch):
    _native(monkeypatch, True, True)  # a bf16 machine writes the checkpoint
    first = _trainer(tmp_path, "auto")
    assert first.precision == "bf16"
    first.step = 2
    first.save_checkpoint()
    _native(monkeypatch, False, False)  # an AVX2 machine tries to resume it
    second = _trainer(tmp_path, "auto")
    assert second.precision == "fp32"
    with pytest.raises(CheckpointError) as err:
        second.try_resume()
    message = str(err.value)
    assert "\n" not in message and "bf16" in message and "fp32" in message and "langevin.precision: bf16" in message
    assert second.step == 0
    # an explicit bf16 resumes it on the same AVX2 machine
    explicit = _trainer(tmp_path, "bf16")
    assert explicit.try_resume() and explicit.step == 2


def test_precision_used_is_in_metrics_the_model_file_and_the_mlflow_run(tmp_path, monkeypatch, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.checkpoint import MODEL_FORMAT, safe_load
    from pipeline.stages import prepare, train

    monkeypatch.chdir(tmp_path)
    tiny_params = parse_params(tiny_params_dict({"tracking": {"log_model": False}}))  # no model export: not tested here
    _native(monkeypatch, False, False)
    prepare.run(tiny_params)
    train.run(tiny_params, progress=False)
    metrics = json.loads((Path(tiny_params.paths.metrics_dir) / "train.json").read_text())
    assert metrics["precision"] == "fp32"
    kernels = resolve_kernels("auto", "fp32", torch.device("cpu"))  # compiled wherever a C compiler builds them
    assert metrics["kernels"] == kernels
    assert safe_load(tiny_params.paths.model, MODEL_FORMAT)["precision"] == "fp32"
    run_id = tracking.read_run_info(tiny_params.paths.run_info)
    run = MlflowClient(tracking_uri=tracking.tracking_uri()).get_run(run_id)
    assert run.data.params["langevin.precision"] == "auto"
    assert run.data.params["langevin.precision_resolved"] == "fp32"
    assert run.data.params["langevin.kernels"] == "auto"
    assert run.data.params["langevin.kernels_resolved"] == kernels
    assert run.data.tags["kernels"] == kernels
    assert run.data.tags["precision"] == "fp32"
    assert run.data.tags["hardware.bf16_native"] == "false"
    assert run.data.tags["hardware.cpu_isa"] == torch.backends.cpu.get_cpu_capability()


def test_a_refused_resume_is_one_line_and_exit_1_from_the_command_line(tmp_path):
    """The CLI path: a checkpoint claiming another precision stops `python -m pipeline train` in one line."""
    from pipeline import data
    from pipeline.stages import prepare

    write_params(tmp_path / "params.yaml", {"langevin": {"precision": "fp32"}, "tracking": {"enabled": False}})
    params = parse_params(tiny_params_dict({"langevin": {"precision": "bf16"}, "tracking": {"enabled": False}}))
    prepare.run(dataclasses.replace(params, paths=dataclasses.replace(params.paths, prepared_dir=str(tmp_path / "data" / "prepared"))))
    images = data.load_split(tmp_path / "data" / "prepared" / "train.pt").images
    ckpt = tmp_path / "models" / "checkpoints" / "last.pt"
    writer = Trainer(params, images, CPU, NullTracker(), ckpt, progress=False)
    writer.step = 1
    writer.save_checkpoint()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--no-progress"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: the checkpoint") and "bf16" in lines[0], proc.stderr
    assert not (tmp_path / "models" / "ebm.pt").exists()
