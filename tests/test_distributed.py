"""Issue 8: data-parallel training under torchrun, as 2 CPU processes (gloo) on a tiny config.

A module-scoped reference run pays for `prepare` and one uninterrupted 2-rank `train` once; the
MLflow, output and resume checks all compare against it. Each rank also appends its own
(unaveraged) statistics to a JSONL file (EBM_DEBUG_RANK_STATS), so the test can recompute
the means over ranks that rank 0 logged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT_FORMAT, MODEL_FORMAT, CheckpointError, safe_load
from pipeline.distributed import DEBUG_STATS_ENV, ENV_VARS, Dist
from tests.conftest import BIN, copy_prepared, write_params

WORLD = 2
DIST = {
    "runtime": {"device": "cpu"},  # gloo, even where a GPU is present
    "data": {"limit": 128},
    "langevin": {"steps": 10},
    "train": {"epochs": 10, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "sample_every": 0},
    "tracking": {"enabled": True, "log_model": False},
}
TOTAL = 10 * (128 // WORLD // 16)  # a rank reads 64 images an epoch: 4 steps


def _env(db: Path, stats: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for var in (*ENV_VARS, "MASTER_ADDR", "MASTER_PORT", DEBUG_STATS_ENV):
        env.pop(var, None)  # nothing from an outer launcher
    if stats is not None:
        env[DEBUG_STATS_ENV] = str(stats)
    return env


def _launch(cwd: Path, stats: Path | None = None) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 --standalone -m pipeline train`, its output in files under cwd."""
    log = cwd / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--standalone",
           "-m", "pipeline", "train", "--no-progress"]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(cwd / "mlflow.db", stats), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _output(cwd: Path) -> str:
    return (cwd / "torchrun.log").read_text()[-6000:]


def _finish(proc: subprocess.Popen, cwd: Path) -> None:
    assert proc.wait(timeout=240) == 0, _output(cwd)


def _checkpoint(cwd: Path) -> Path:
    return cwd / "models" / "checkpoints" / "last.pt"


def _checkpoint_step(cwd: Path) -> int:
    try:
        return int(safe_load(_checkpoint(cwd), CHECKPOINT_FORMAT)["step"])
    except CheckpointError:
        return -1


def _wait_for_checkpoint(proc: subprocess.Popen, cwd: Path, at_least: int) -> None:
    deadline = time.time() + 180
    while _checkpoint_step(cwd) < at_least:
        assert proc.poll() is None, _output(cwd)
        assert time.time() < deadline, _output(cwd)
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a crash of the machine would.

    torchrun starts every worker in a session of its own, so killing torchrun's process group
    alone would leave them running; each worker's group is killed too.
    """
    workers = _children(proc.pid)
    assert len(workers) == WORLD, workers
    for pid in (*workers, proc.pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.time() < deadline
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _weights(cwd: Path) -> dict[str, torch.Tensor]:
    return safe_load(cwd / "models" / "ebm.pt", MODEL_FORMAT)["model"]


def _copy_prepared(src: Path, dest: Path) -> Path:
    return copy_prepared(src, dest, DIST)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`prepare`, then one uninterrupted 2-rank `train` that records every rank's statistics."""
    root = tmp_path_factory.mktemp("ddp")
    write_params(root / "params.yaml", DIST)
    prep = subprocess.run([sys.executable, "-m", "pipeline", "prepare"], cwd=root, env=_env(root / "mlflow.db"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert prep.returncode == 0, prep.stderr[-3000:]
    started = time.perf_counter()
    _finish(_launch(root, stats=root / "rank_stats.jsonl"), root)
    print(f"2-rank train: {time.perf_counter() - started:.1f}s")
    return root


def test_shards_are_disjoint_equal_and_one_process_keeps_everything():
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    shards = [Dist(world_size=4, rank=r).shard(perm) for r in range(4)]
    assert all(len(s) == 103 // 4 for s in shards)
    flat = torch.cat(shards)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    assert torch.equal(Dist().shard(perm), perm)


def test_two_ranks_log_the_mean_over_ranks(reference):
    from mlflow.tracking import MlflowClient

    root = reference
    assert json.loads((root / "metrics" / "train.json").read_text())["steps"] == TOTAL  # the epoch is sharded
    per_rank: dict[tuple[int, int], dict] = {}
    for line in (root / "rank_stats.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["world_size"] == WORLD
        per_rank[rec["rank"], rec["step"]] = rec  # a later record of a step (after a rollback) wins

    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["train.world_size"] == str(WORLD)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, TOTAL + 1))
    differ = 0
    for m in history:
        losses = [per_rank[r, m.step]["loss"] for r in range(WORLD)]
        assert m.value == pytest.approx(sum(losses) / WORLD, rel=1e-12, abs=1e-12)
        differ += losses[0] != losses[1]
        # DDP averaged the gradients: both ranks clipped and stepped with the very same ones
        assert per_rank[0, m.step]["grad_norm"] == per_rank[1, m.step]["grad_norm"]
    assert differ == len(history)  # each rank saw its own data and chains


def test_model_file_loads_in_a_single_process(reference):
    from pipeline.stages.common import load_energy_model

    weights = _weights(reference)
    assert not any(k.startswith("module.") for k in weights)
    model, blob = load_energy_model(reference / "models" / "ebm.pt", torch.device("cpu"))
    assert blob["steps"] == TOTAL
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 32, 32)).shape == (3,)
    assert not _checkpoint(reference).exists()  # removed once the model file is written


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(reference, tmp_path):
    """SIGTERM to torchrun: the ranks agree on a step, save and stop. Resume, SIGKILL everything
    mid-run, resume again: the final weights are those of the uninterrupted run."""
    from pipeline import data
    from pipeline.config import load_params
    from pipeline.tracking import NullTracker
    from pipeline.train import Trainer

    cwd = _copy_prepared(reference, tmp_path / "interrupted")
    proc = _launch(cwd)
    _wait_for_checkpoint(proc, cwd, at_least=4)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
    assert proc.wait(timeout=90) != 0
    assert "stopped by SIGTERM" in _output(cwd) and "checkpoint saved" in _output(cwd), _output(cwd)
    first = _checkpoint_step(cwd)
    assert 4 <= first < TOTAL, first
    assert not (cwd / "models" / "ebm.pt").exists()

    # The distributed checkpoint: every rank's buffer and RNG states, weights without DDP's prefix.
    state = safe_load(_checkpoint(cwd), CHECKPOINT_FORMAT)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    assert not any(k.startswith("module.") for k in state["model"])
    assert torch.equal(state["buffer"]["storage"], state["ranks"][0]["buffer"]["storage"])
    assert not torch.equal(state["ranks"][0]["buffer"]["storage"], state["ranks"][1]["buffer"]["storage"])
    # ... which a single process resumes from
    params = load_params(cwd / "params.yaml")
    images = data.load_split(cwd / "data" / "prepared" / "train.pt").images
    single = Trainer(params, images, torch.device("cpu"), NullTracker(), _checkpoint(cwd), progress=False)
    assert single.try_resume() and single.step == first
    assert all(torch.equal(v, state["model"][k]) for k, v in single.model.state_dict().items())
    assert torch.equal(single.buffer.storage, state["ranks"][0]["buffer"]["storage"])

    proc = _launch(cwd)
    _wait_for_checkpoint(proc, cwd, at_least=first + 4)
    _kill_everything(proc)
    second = _checkpoint_step(cwd)
    assert first < second < TOTAL, (first, second)

    _finish(_launch(cwd), cwd)
    assert f"resuming from step {second} of {TOTAL}" in _output(cwd)
    expected = _weights(reference)
    got = _weights(cwd)
    assert max((got[k].double() - expected[k].double()).abs().max().item() for k in expected) <= 1e-6
    assert json.loads((cwd / "models" / "run.json").read_text())["run_id"] == state["run_id"]  # one MLflow run
