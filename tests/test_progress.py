"""Where a training run stands, at every epoch (chromalab.train.callbacks.RunProgress): the line under Keras'
own, its projection of the end, and the one warning a CPU-only machine gets before a run of days."""

from __future__ import annotations

import io
import re
import time

import pytest

from chromalab.train.callbacks import RunProgress, duration

LINE = re.compile(r"^train@gan: epoch (\d+)/(\d+), (\S+) elapsed, ~(\S+) left \(ends ~\d{4}-\d\d-\d\d \d\d:\d\d\)$")


def seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", text))


def train(progress: RunProgress, epochs: range, pause: float) -> None:
    for epoch in epochs:
        progress.on_epoch_begin(epoch)
        time.sleep(pause)
        progress.on_epoch_end(epoch)


def test_each_epoch_says_where_the_run_stands_and_projects_its_end():
    out = io.StringIO()
    # A run slowed on purpose to 0.25 s an epoch, resumed at epoch 10 of 60: 4 trained here, 46 left. Its
    # first epoch here also compiled the step (1 s more), which the projection leaves out once it can.
    progress = RunProgress("train@gan", 60, has_gpu=False, out=out)
    train(progress, range(10, 11), 1.25)
    train(progress, range(11, 14), 0.25)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [11, 12, 13, 14]
    assert seconds(matches[0].group(4)) == pytest.approx(49 * 1.25, rel=0.25)  # one epoch: all it has
    assert seconds(matches[-1].group(3)) == pytest.approx(2.0, abs=0.6)  # 1.25 + 3 × 0.25 s
    assert seconds(matches[-1].group(4)) == pytest.approx(46 * 0.25, rel=0.25)  # 11.5 s at this pace
    assert "no GPU" not in out.getvalue()  # minutes: nothing to warn about


@pytest.mark.parametrize("has_gpu", [False, True])
def test_a_run_of_hours_on_a_cpu_says_so_once_and_names_the_small_run(has_gpu):
    out, now = io.StringIO(), [0.0]

    def clock() -> float:  # 90 s an epoch, as a full-size GAN epoch might take on two cores
        return now[0]

    progress = RunProgress("train@gan", 200, has_gpu=has_gpu, clock=clock, out=out)
    for epoch in range(3):
        progress.on_epoch_begin(epoch)
        now[0] += 90.0
        progress.on_epoch_end(epoch)
    warnings = [line for line in out.getvalue().splitlines() if "no GPU" in line]
    if has_gpu:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "5h00m" in warnings[0] and "A small run on a CPU" in warnings[0]
    assert "~4h55m left" in out.getvalue().splitlines()[-1]  # 197 epochs × 90 s


def test_durations_read_as_a_person_would():
    assert [duration(s) for s in (0, 41.4, 725, 11220)] == ["0s", "41s", "12m05s", "3h07m"]
