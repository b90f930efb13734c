"""Training survives kills, signals and divergence; bad checkpoints fail clearly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import tracking
from pipeline.checkpoint import CHECKPOINT_FORMAT, CheckpointError, MODEL_FORMAT, atomic_save, safe_load
from pipeline.config import TrackingConfig, parse_params
from pipeline.train import Trainer, TrainingDiverged, TrainingInterrupted, cd_step
from pipeline.tracking import NullTracker
from tests.conftest import copy_prepared, tiny_params_dict, write_params

# Long enough (128 steps) to be killed in the middle, still a few seconds in all.
EPOCHS = 16
TOTAL_STEPS = EPOCHS * (128 // 16)
SLOW = {
    "runtime": {"device": "cpu"},  # the exact-resume comparisons are CPU arithmetic, also on a GPU host
    "data": {"limit": 128},
    "langevin": {"steps": 10},
    "train": {"epochs": EPOCHS, "batch_size": 16, "checkpoint_every": 3, "log_every": 1, "sample_every": 0},
    "tracking": {"enabled": False},
}


def _stage(cmd: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", cmd, "--no-progress"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


def _run_stage(cmd: str, cwd: Path) -> None:
    proc = _stage(cmd, cwd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _weights(cwd: Path) -> dict[str, torch.Tensor]:
    return safe_load(cwd / "models" / "ebm.pt", MODEL_FORMAT)["model"]


def _checkpoint_step(cwd: Path) -> int:
    path = cwd / "models" / "checkpoints" / "last.pt"
    if not path.is_file():
        return -1
    try:
        return int(safe_load(path, CHECKPOINT_FORMAT)["step"])
    except CheckpointError:
        return -1


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted training run of the SLOW config, and a prepared-data folder to copy."""
    root = tmp_path_factory.mktemp("reference")
    write_params(root / "params.yaml", SLOW)
    _run_stage("prepare", root)
    _run_stage("train", root)
    return root, _weights(root)


def _fresh_copy(reference_root: Path, dest: Path) -> Path:
    return copy_prepared(reference_root, dest, SLOW)


def _interrupt_midway(cwd: Path, sig: int, at_least: int = 7) -> subprocess.Popen:
    proc = _stage("train", cwd)
    deadline = time.time() + 120
    while _checkpoint_step(cwd) < at_least:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def test_sigkill_then_resume_equals_uninterrupted(reference, tmp_path):
    root, expected = reference
    cwd = _fresh_copy(root, tmp_path / "killed")
    proc = _interrupt_midway(cwd, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    step = _checkpoint_step(cwd)
    total = TOTAL_STEPS
    assert 0 < step < total, step  # killed in the middle, with a checkpoint to resume from
    assert not (cwd / "models" / "ebm.pt").exists()
    _run_stage("train", cwd)  # what `dvc repro` runs again
    assert _max_diff(_weights(cwd), expected) <= 1e-6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_then_resume_completes(reference, tmp_path, sig):
    root, expected = reference
    cwd = _fresh_copy(root, tmp_path / "signalled")
    proc = _interrupt_midway(cwd, sig, at_least=4)
    assert proc.returncode == 128 + sig, proc.stderr.read()
    assert "checkpoint saved" in proc.stderr.read()
    step = _checkpoint_step(cwd)
    assert step >= 4
    _run_stage("train", cwd)
    assert _max_diff(_weights(cwd), expected) <= 1e-6


def _trainer(tmp_path, step_fn=cd_step, **train):
    raw = tiny_params_dict({"train": {"epochs": 3, "checkpoint_every": 2, **train}, "tracking": {"enabled": False}})
    params = parse_params(raw)
    images = torch.rand(48, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # the same data each call
    return Trainer(
        params, images, torch.device("cpu"), NullTracker(), tmp_path / "ckpt.pt", progress=False, step_fn=step_fn
    )


def _poison_once(at_step: int):
    """A step function that, at trainer step ``at_step``, leaves NaN weights and a NaN loss, once."""
    state = {"done": False, "trainer": None}

    def step_fn(model, optimizer, *args, **kwargs):
        stats = cd_step(model, optimizer, *args, **kwargs)
        if state["trainer"].step == at_step and not state["done"]:
            state["done"] = True
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))  # what an exploding update leaves behind
            stats["loss"] = torch.tensor(float("nan"))
        return stats

    return step_fn, state


def test_injected_nan_rolls_back_lowers_the_lr_and_is_recorded_in_mlflow(tmp_path, capsys, mlflow_uri):
    from mlflow.tracking import MlflowClient

    step_fn, poisoned = _poison_once(5)
    trainer = poisoned["trainer"] = _trainer(tmp_path, step_fn=step_fn)
    trainer.tracker = tracking.start_run(TrackingConfig(experiment="rollbacks"), run_name="nan")
    result = trainer.fit()
    trainer.tracker.close()
    assert poisoned["done"]
    assert result.rollbacks == 1
    assert result.steps == trainer.total_steps
    lowered = trainer.cfg.lr * trainer.cfg.rollback_lr_factor
    assert trainer.cfg.rollback_lr_factor == 0.5 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lowered)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    err = [line for line in capsys.readouterr().err.splitlines() if "rolled back" in line]
    assert len(err) == 1 and "divergence at step 5" in err[0] and "rolled back to step 4" in err[0]

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(trainer.tracker.run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "rollback")] == [(5, 1.0)]
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs[5] == pytest.approx(lowered)  # the lowered lr, logged with the rollback
    assert run.data.tags["rollback.1"] == err[0]


@pytest.mark.parametrize("every_step", [True, False], ids=["checked every step (CPU)", "checked at log steps (GPU)"])
def test_divergence_is_caught_at_the_next_checked_step(tmp_path, capsys, every_step):
    """On a GPU the statistics reach the host only at log and checkpoint steps; a NaN waits for the next one.

    9 steps, logged at 3, 6, 9 and checkpointed at 4, 8, 9; the weights turn NaN in step 4. Checked
    every step, step 4 itself rolls back; checked sparsely, step 5 runs on NaN weights unseen and the
    log step after it rolls back. Either way to the checkpoint of step 4, and training ends finite.
    """
    step_fn, poisoned = _poison_once(4)
    trainer = poisoned["trainer"] = _trainer(tmp_path, step_fn=step_fn, log_every=3, checkpoint_every=4)
    trainer.check_every_step = every_step
    result = trainer.fit()
    assert poisoned["done"] and result.rollbacks == 1 and result.steps == trainer.total_steps == 9
    err = [line for line in capsys.readouterr().err.splitlines() if "rolled back" in line]
    assert len(err) == 1 and f"divergence at step {4 if every_step else 5}" in err[0], err
    assert "rolled back to step 4" in err[0]
    assert [row["step"] for row in result.history] == [3, 6, 9]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_score_explosion_beyond_max_rollbacks_stops_with_a_clear_error(tmp_path):
    def exploding(model, optimizer, *args, **kwargs):
        stats = cd_step(model, optimizer, *args, **kwargs)
        stats["max_abs_score"] = torch.tensor(1e9)
        return stats

    trainer = _trainer(tmp_path, step_fn=exploding, max_rollbacks=2)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 0 .*max \|score\|=1e\+09.* after 2 rollbacks"):
        trainer.fit()


def test_truncated_and_foreign_checkpoints_fail_clearly(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.save_checkpoint()
    path = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        trainer.try_resume()
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a ebm-train-checkpoint"):
        trainer.try_resume()
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        safe_load(path, CHECKPOINT_FORMAT)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    first = _trainer(tmp_path)
    first.step = 3
    first.save_checkpoint()
    other = _trainer(tmp_path, alpha=0.3)
    assert not other.try_resume() and other.step == 0
    same = _trainer(tmp_path)
    assert same.try_resume() and same.step == 3


def _checkpoint_midway(tmp_path, stop_after: int = 5) -> Path:
    """A checkpoint of the _trainer config after ``stop_after`` of its 9 steps (a stop, as on SIGINT)."""
    def step_fn(*args, **kwargs):
        stats = cd_step(*args, **kwargs)
        if trainer.step == stop_after - 1:
            trainer._signal = signal.SIGINT
        return stats

    trainer = _trainer(tmp_path, step_fn=step_fn)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    return trainer.checkpoint_path


def _rewrite(path: Path, edit) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    atomic_save(state, path)
    return state


def test_checkpoint_from_another_device_carries_over_and_reseeds_deterministically(tmp_path, capsys):
    """A checkpoint written on a GPU, resumed on the CPU: its CUDA generator state cannot be set here.

    The checkpoint claims CUDA and holds a CUDA-shaped generator state (16 bytes: seed, offset), as a
    GPU run writes it. The resume keeps weights, optimizer, buffer and step, reseeds the generator
    from train.seed and the step, says so in one line, and two such resumes train alike.
    """
    path = _checkpoint_midway(tmp_path)
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        torch.Generator().set_state(cuda_state)  # what restoring it as it is would do

    def as_if_on_cuda(state):
        state["resolved"]["device"] = "cuda"
        state["rng"]["generators"]["train"] = cuda_state
        state["rng"]["cuda"] = [cuda_state]

    saved = _rewrite(path, as_if_on_cuda)
    capsys.readouterr()
    resumed = _trainer(tmp_path)
    assert resumed.try_resume() and resumed.step == saved["step"] == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written on cuda, resuming on cpu" in err[0], err
    assert f"restart from seed {resumed._reseed(5)}" in err[0]
    assert resumed.generator.initial_seed() == resumed._reseed(5)
    for key, value in saved["model"].items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert torch.equal(resumed.buffer.storage, saved["buffer"]["storage"])
    assert resumed.buffer.fill == saved["buffer"]["fill"] and resumed.buffer.ptr == saved["buffer"]["ptr"]
    assert resumed.optimizer.state_dict()["state"][0]["step"] == saved["optimizer"]["state"][0]["step"]
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"])

    again = _trainer(tmp_path)
    assert again.try_resume()
    first, second = resumed.fit(), again.fit()
    assert first.steps == second.steps == 9
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_sampled_in_another_precision_is_refused_in_one_line(tmp_path):
    path = _checkpoint_midway(tmp_path)
    here = _trainer(tmp_path).precision  # fp32, or bf16 where the CPU runs it natively
    other = "fp32" if here == "bf16" else "bf16"
    _rewrite(path, lambda state: state["resolved"].update(precision=other))
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        _trainer(tmp_path).try_resume()
    message = str(info.value)
    assert "\n" not in message and message.startswith("train: ")
    assert f"sampled in {other}" in message and f"is {here} here" in message
    assert f"langevin.precision: {other}" in message and "delete the checkpoint" in message
    assert path.read_bytes() == before  # the checkpoint is left as it was


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    atomic_save({"format": "x", "v": torch.ones(3)}, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_servers_bind_to_loopback():
    """The MLflow UI and the Prefect server that the Makefile starts listen on 127.0.0.1 only."""
    import re
    import shutil

    from tests.conftest import ROOT

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for target, program in (("ui", "mlflow ui"), ("serve", "prefect server start")):
        dry = subprocess.run(["make", "-n", "-o", "setup", target], cwd=ROOT, capture_output=True, text=True, check=True)
        joined = re.sub(r"\\\n", " ", dry.stdout)  # one line per command, continuations joined
        commands = [line for line in joined.splitlines() if program in line]
        assert commands, dry.stdout
        for line in commands:
            hosts = re.findall(r"--host[= ]+\"?([^\s\"]+)", line)
            assert hosts == ["127.0.0.1"], line


@pytest.mark.slow
def test_dvc_repro_after_sigkill_resumes_and_matches(reference, tmp_path):
    """The persist: true checkpoint folder survives DVC's clean-up, so a second `dvc repro` resumes."""
    from tests.conftest import make_repo, run

    root, expected = reference
    repo = make_repo(tmp_path / "repo", SLOW)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        ["dvc", "repro", "train"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while _checkpoint_step(repo) < 7:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the training process with it
    proc.wait(timeout=60)
    killed_at = _checkpoint_step(repo)
    assert 0 < killed_at < TOTAL_STEPS
    # up to train: the stages after it are not what this test is about
    out = run(["dvc", "repro", "train"], repo, env={"OMP_NUM_THREADS": "1"}).stdout  # same threads, same chain groups
    assert "resuming from step" in out
    assert _max_diff(_weights(repo), expected) <= 1e-6
