"""The benchmark runs on a tiny config and prints its lines (it is not a timed test)."""

import subprocess
import sys

import yaml

from tests.conftest import tiny_params_dict


def test_bench_prints_every_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--params", str(params), "--iters", "2", "--steps", "3", "--batch-size", "16",
         "--gen-samples", "8", "--gen-steps", "3", "--ablation", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "batch 16 x 3 Langevin steps" in out
    for needle in ("eager fp32 reference:", "project trainer:", "matmul", "generate: 8 samples x 3 Langevin steps",
                   "peak memory:"):
        assert needle in out, out
    ablation = [line for line in out.splitlines() if line.startswith("sampler alone (")]
    assert len(ablation) == 1 and "16 chains x 3 steps" in ablation[0]
    from pipeline.bench import SAMPLER_VARIANTS

    cells = ablation[0].split(": ", 1)[1].split(" | ")
    assert [cell.rsplit(" ", 2)[0] for cell in cells] == [variant[0] for variant in SAMPLER_VARIANTS], ablation[0]
    speedup = [line for line in out.splitlines() if line.startswith("speedup: ")]
    assert len(speedup) == 1 and speedup[0].endswith("x") and float(speedup[0][9:-1]) > 0


def test_bench_rejects_a_bad_value_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--params", str(params), "--set", "langevin.step_size=-1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["params: langevin.step_size=-1.0 is invalid: a number > 0"]
