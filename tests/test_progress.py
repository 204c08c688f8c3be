"""`training.progress.Progress`: what a long command prints on stderr, in a log and on a terminal."""

from __future__ import annotations

import io
import re
import time

from training.progress import Progress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_output_is_rate_limited_and_ends_with_a_summary() -> None:
    out = io.StringIO()
    p = Progress(200, "train", unit="step", interval=0.05, stream=out)
    for i in range(200):
        p.update(loss=1.0 / (i + 1))
        time.sleep(0.001)
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 1/200 (  0%)") and "ETA" in lines[0] and "loss=1" in lines[0]
    assert 3 <= len(lines) <= 12, "a line per interval, not per step"
    assert re.match(r"train: 200/200 step in 0:0\d \(\d+(\.\d+)? step/s\)  loss=0\.005$", lines[-1])
    assert "\r" not in out.getvalue()


def test_eta_follows_the_rate_after_a_slow_start() -> None:
    p = Progress(10, "prepare", interval=60, stream=io.StringIO())
    time.sleep(0.6)  # start-up (imports, a first step that warms up) before the first unit
    p.update()
    for _ in range(3):
        time.sleep(0.02)
        p.update()
    # 3 units in ~0.06 s since the first: the 6 left take ~0.12 s, not 6 x 0.66 / 4 = 1 s
    assert 0.1 < p.eta() < 0.5, p.eta()
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "--:--"


def test_terminal_line_is_redrawn_and_messages_get_their_own_line() -> None:
    term = Terminal()
    p = Progress(None, "analyse", interval=0.0, stream=term)
    p.update(3, file="a.wav")
    p.log("note: a.wav is quiet")
    p.update()
    p.close()
    text = term.getvalue()
    assert "\r\x1b[2Kanalyse: 3 it" in text and "ETA" not in text
    assert "\nnote: a.wav is quiet\n" in text
    final = text.rsplit("\r\x1b[2K", 1)[1]
    assert re.fullmatch(r"analyse: 4 it in 0:00 \([\d.e+]+ it/s\)  file=a\.wav\n", final), final
