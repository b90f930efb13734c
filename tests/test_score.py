"""`python -m pipeline score FILE...`: npy and PNG images scored against the stored threshold; bad files in one line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.__main__ import main
from pipeline.checkpoint import MODEL_FORMAT, atomic_save
from pipeline.evaluate import score_images
from pipeline.model import EnergyNet
from pipeline.stages.common import file_md5
from tests.conftest import ROOT, write_params


def digits(n: int = 4) -> torch.Tensor:
    """(n, 1, 32, 32) images in [-1, 1] on a 2-pixel background border, so their inner 28 x 28 is the whole digit."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1, 32, 32), -1.0)
    x[..., 2:30, 2:30] = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    return torch.round((x + 1) * 127.5) / 127.5 - 1  # exactly representable as 0-255 intensities


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """A workspace with params.yaml, a model and its threshold file (the median score of ``digits()``)."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    torch.manual_seed(0)
    model = EnergyNet().eval()
    config = {"channels": [16, 32, 64, 64], "hidden": 64}
    atomic_save({"format": MODEL_FORMAT, "model": model.state_dict(), "model_config": config}, tmp_path / "models" / "ebm.pt")
    scores = score_images(model, digits(), torch.device("cpu"))
    threshold = float(np.median(scores))
    record = {"threshold": threshold, "model_md5": file_md5(tmp_path / "models" / "ebm.pt")}
    (tmp_path / "models" / "threshold.json").write_text(json.dumps(record))
    return tmp_path, scores, threshold


def _rows(out: str) -> list[tuple[str, int, float, str]]:
    lines = out.strip().splitlines()
    assert lines[0].startswith("threshold ") and lines[1] == "file\timage\tscore\tverdict"
    return [(f, int(i), float(s), v) for f, i, s, v in (line.split("\t") for line in lines[2:])]


def test_score_reads_npy_and_png_in_every_layout(scored, capsys):
    tmp, scores, threshold = scored
    x = digits()
    pixels = np.rint((x[:, 0, 2:30, 2:30].numpy() + 1) * 127.5).astype(np.uint8)  # (N, 28, 28) in 0..255
    np.save(tmp / "stack.npy", x[:, 0].numpy())  # N x 32 x 32 in [-1, 1]
    np.save(tmp / "channels.npy", x.numpy())  # N x 1 x 32 x 32
    np.save(tmp / "mnist.npy", pixels[1])  # one 28 x 28 digit, 0-255
    np.save(tmp / "floats255.npy", pixels[2:].astype(np.float64))  # N x 28 x 28 floats in 0-255
    Image.fromarray(pixels[3]).save(tmp / "digit.png")
    Image.fromarray(np.pad(pixels[0], 2)).convert("RGBA").save(tmp / "digit32.png")  # 32 x 32, colour + alpha

    files = ["stack.npy", "channels.npy", "mnist.npy", "floats255.npy", "digit.png", "digit32.png"]
    assert main(["score", *files]) == 0
    rows = _rows(capsys.readouterr().out)
    printed: dict[str, list[tuple[float, str]]] = {}
    for f, _, s, verdict in rows:
        printed.setdefault(f, []).append((s, verdict))
    # which of digits() each file holds: the same image gives the same score, however it was stored
    holds = {"stack.npy": [0, 1, 2, 3], "channels.npy": [0, 1, 2, 3], "mnist.npy": [1], "floats255.npy": [2, 3],
             "digit.png": [3], "digit32.png": [0]}
    for f, indices in holds.items():
        expected = [(round(float(scores[i]), 5), "in" if scores[i] >= threshold else "out") for i in indices]
        assert printed[f] == expected, f
    assert {v for *_, v in rows} == {"in", "out"}  # the median threshold splits the digits


BAD_FILES = {
    "wrong-shape.npy": (lambda p: np.save(p, np.zeros((3, 30, 30), np.float32)), "shape (3, 30, 30)"),
    "five-dims.npy": (lambda p: np.save(p, np.zeros((2, 1, 1, 32, 32))), "shape"),
    "garbage.npy": (lambda p: p.write_bytes(b"not an array"), "cannot read"),
    "out-of-range.npy": (lambda p: np.save(p, np.full((32, 32), 300.0)), "[-1, 1] or [0, 255]"),
    "nan.npy": (lambda p: np.save(p, np.full((32, 32), np.nan)), "NaN"),
    "large.png": (lambda p: Image.fromarray(np.zeros((40, 40), np.uint8)).save(p), "40 x 40"),
    "garbage.png": (lambda p: p.write_bytes(b"\x89PNG but not really"), "cannot read"),
    "digit.txt": (lambda p: p.write_text("7"), "neither .npy nor .png"),
    "missing.npy": (lambda p: None, "not found"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_is_one_line_and_exit_1(scored, capsys, name):
    tmp, *_ = scored
    write, expected = BAD_FILES[name]
    write(tmp / name)
    np.save(tmp / "good.npy", digits(1).numpy())
    assert main(["score", "good.npy", name]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # every file is read before any is scored
    assert captured.err.count("\n") == 1 and name in captured.err and expected in captured.err


def test_a_threshold_of_another_model_is_refused(scored, capsys):
    tmp, *_ = scored
    np.save(tmp / "good.npy", digits(1).numpy())
    record = json.loads((tmp / "models" / "threshold.json").read_text())
    (tmp / "models" / "threshold.json").write_text(json.dumps({**record, "model_md5": "0" * 32}))
    assert main(["score", "good.npy"]) == 1
    assert "another model" in capsys.readouterr().err


def test_the_command_line_exits_1_without_a_traceback(scored):
    tmp, *_ = scored
    np.save(tmp / "bad.npy", np.zeros((7, 7)))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "score", "bad.npy"],
        cwd=tmp, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=False,
    )
    assert proc.returncode == 1
    expected = "score: bad.npy holds an array of shape (7, 7); expected N x 32 x 32, N x 1 x 32 x 32 or 28 x 28 images"
    assert proc.stderr.strip().splitlines() == [expected]
