"""Progress: a bar on a terminal, a plain line every runtime.progress_seconds in a log, nothing when asked.

The unit tests drive pipeline/progress.py with a fake clock; the stage tests run training, the
classifier and generation with stderr captured (not a terminal), as in `make run > log`, in CI or
under a Prefect worker, and read the lines they print.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.progress import Progress, format_duration, progress_mode
from tests.conftest import write_params

LINE = re.compile(
    r"^(?P<what>\w+): step (?P<n>\d+)/(?P<total>\d+) \(\d+%\)(?P<stats>(, [a-z ]+ -?[\d.e+-]+)*)"
    r", (?P<per>[\d.e+-]+) s/(it|step), ETA (?P<eta>\d+s|\d+m\d\ds|\d+h\d\dm)$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_flag():
    assert progress_mode(True, Terminal()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"  # a file, a pipe: make run > log, CI, a Prefect worker
    assert progress_mode(False, Terminal()) == "off" and progress_mode(False, io.StringIO()) == "off"


def test_lines_come_at_a_steady_interval_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    progress = Progress("train", 100, mode="lines", interval=30.0, stream=out, clock=clock)
    for step in range(100):
        clock.now += 7.0  # 7 s per step
        progress.update(1, {"loss": -0.5 + step / 1000, "real score": 0.25, "fake score": -0.125})
    progress.close()
    lines = out.getvalue().splitlines()
    steps = [int(LINE.match(line)["n"]) for line in lines]
    # a line at the first step at least 30 s after the previous line, and the last step's
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100]
    first = LINE.match(lines[0])
    assert first["what"] == "train" and first["total"] == "100"
    assert lines[0] == "train: step 5/100 (5%), loss -0.496, real score 0.25, fake score -0.125, 7 s/it, ETA 11m05s"
    assert lines[-1].endswith("ETA 0s")


def test_stats_persist_until_new_ones_arrive_and_a_rollback_restarts_the_rate():
    clock, out = Clock(), io.StringIO()
    progress = Progress("train", 10, mode="lines", interval=0.0, stream=out, clock=clock, initial=4)
    clock.now += 2.0
    progress.update(1, {"loss": 0.5})
    clock.now += 2.0
    progress.update(1)  # no new statistics (a GPU step between log steps): the last ones stay
    progress.moveto(4)  # rolled back to step 4
    clock.now += 10.0
    progress.update(1)
    assert out.getvalue().splitlines() == [
        "train: step 5/10 (50%), loss 0.5, 2 s/it, ETA 10s",
        "train: step 6/10 (60%), loss 0.5, 2 s/it, ETA 8s",
        "train: step 5/10 (50%), loss 0.5, 10 s/it, ETA 50s",
    ]
    progress.write("train: divergence at step 5")
    assert out.getvalue().splitlines()[-1] == "train: divergence at step 5"


def test_a_line_is_due_at_the_interval_and_at_the_end():
    clock = Clock()
    progress = Progress("train", 3, mode="lines", interval=30.0, stream=io.StringIO(), clock=clock)
    assert not progress.due()
    clock.now += 30.0
    assert progress.due()
    progress.update(1)
    assert not progress.due() and progress.due(2)  # 3 of 3: the last line
    assert not Progress("train", 1, mode="bar", stream=Terminal()).due()


def test_lines_carry_the_statistics_also_between_checked_steps(tmp_path, capsys):
    """On a GPU the statistics reach the host at log and checkpoint steps; a line between them fetches its own."""
    import torch

    from pipeline.config import parse_params
    from pipeline.tracking import NullTracker
    from pipeline.train import Trainer
    from tests.conftest import tiny_params_dict

    raw = tiny_params_dict(
        {"runtime": {"progress_seconds": 0}, "train": {"log_every": 4, "checkpoint_every": 4, "sample_every": 0}}
    )
    images = torch.rand(32, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer = Trainer(
        parse_params(raw), images, torch.device("cpu"), NullTracker(), tmp_path / "c.pt", progress="lines"
    )
    trainer.check_every_step = False  # as on a GPU
    trainer.fit()
    lines = _lines(capsys.readouterr().err, "train")
    assert [int(m["n"]) for m in lines] == [1, 2, 3, 4]  # steps 1-3 are neither log nor checkpoint steps
    for m in lines:
        assert re.findall(r", ([a-z ]+) -?\d", m["stats"]) == ["loss", "real score", "fake score"], m[0]


def test_off_prints_nothing_and_the_bar_draws_on_a_terminal():
    out = io.StringIO()
    progress = Progress("generate", 3, mode="off", interval=0.0, stream=out)
    for _ in range(3):
        progress.update(1, {"loss": 1.0})
    progress.close()
    assert out.getvalue() == ""
    tty = Terminal()
    bar = Progress("generate", 3, mode=progress_mode(True, tty), interval=0.0, stream=tty, unit="step")
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue() and "generate" in tty.getvalue() and "s/step" not in tty.getvalue()


def test_durations():
    assert [format_duration(s) for s in (0, 42.4, 60, 470, 3599, 3600, 7500)] == [
        "0s", "42s", "1m00s", "7m50s", "59m59s", "1h00m", "2h05m"
    ]


# ------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from pipeline.__main__ import main

    root = tmp_path_factory.mktemp("progress")
    write_params(root / "params.yaml", {"runtime": {"progress_seconds": 0}, "tracking": {"enabled": False}})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["prepare"]) == 0
    finally:
        os.chdir(cwd)
    return root


def _lines(err: str, what: str) -> list[re.Match]:
    found = [LINE.match(line) for line in err.splitlines() if line.startswith(f"{what}: step ")]
    assert found and all(found), err
    return found


def test_stages_print_a_line_per_interval_when_stderr_is_not_a_terminal(prepared, tmp_path, monkeypatch, capsys):
    """progress_seconds 0: a line at every step, with what each stage knows of its progress."""
    from pipeline.__main__ import main

    shutil.copytree(prepared, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    for stage in ("train_classifier", "train", "generate"):
        assert main([stage]) == 0, stage
    err = capsys.readouterr().err

    train = _lines(err, "train")
    assert [int(m["n"]) for m in train] == list(range(1, 9)) and {m["total"] for m in train} == {"8"}
    for m in train:  # step/total, loss, mean real and fake score, s/it, ETA
        assert re.findall(r", ([a-z ]+) -?\d", m["stats"]) == ["loss", "real score", "fake score"], m[0]
    assert train[-1]["eta"] == "0s"
    classifier = _lines(err, "classifier")
    assert [int(m["n"]) for m in classifier] == [1, 2] and classifier[0]["stats"].startswith(", loss ")
    generate = _lines(err, "generate")
    assert [int(m["n"]) for m in generate] == list(range(1, 19))  # 3 snapshots x 8 chains (a batch each) x 6 steps

    assert main(["train_classifier", "--no-progress"]) == 0
    assert main(["generate", "--no-progress"]) == 0
    assert " step " not in capsys.readouterr().err


def test_train_into_a_log_file_prints_plain_lines(prepared, tmp_path):
    """As `python -m pipeline train 2> log`: no bar's carriage returns, one line per interval."""
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "train"],
            cwd=work, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=False,
        )
    text = (tmp_path / "log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert [int(m["n"]) for m in _lines(text, "train")] == list(range(1, 9))
