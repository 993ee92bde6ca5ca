"""The time-left line: when it is said, and what it says."""

import pytest

from foundation import estimate
from foundation.estimate import FIRST_AFTER, TIMED_STEPS, TimeLeft


def test_the_estimate_comes_after_the_timed_steps_and_again_after_a_change_of_pace(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: now[0])
    time_left = TimeLeft(start_step=0, total_steps=1000, hint="--max-steps 500 halves it", also_at=(400,))
    said = {}
    for step in range(1, 1001):
        now[0] += 0.1 if step <= 400 else 0.25  # the discriminator more than doubles the cost of a step
        line = time_left.step_done(step)
        if line:
            said[step] = line
    first, second = FIRST_AFTER + TIMED_STEPS, 400 + FIRST_AFTER + TIMED_STEPS
    assert list(said) == [first, second]
    assert said[first] == (f"about 1m38s left for steps {first + 1}-1000 at 100 ms a step on this machine "
                           f"(the pace until step 400, where it changes; said again after); --max-steps 500 halves it")
    assert said[second] == f"about 2m24s left for steps {second + 1}-1000 at 250 ms a step on this machine; --max-steps 500 halves it"


def test_a_resumed_run_estimates_from_where_it_resumed_and_evaluation_is_not_a_step(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: now[0])
    time_left = TimeLeft(start_step=500, total_steps=1000)
    for step in range(501, 501 + FIRST_AFTER + TIMED_STEPS):
        now[0] += 0.2
        line = time_left.step_done(step)
        if step == 510:
            now[0] += 30.0  # an evaluation, after which the loop resumes the clock
            time_left.resume()
    assert line == f"about 1m35s left for steps {step + 1}-1000 at 200 ms a step on this machine"
    assert pytest.approx(0.2) == sum(time_left.durations) / len(time_left.durations)


def test_stage_one_says_how_long_it_will_take(tiny_fashion, tmp_path, capsys):
    from stage1_vqvae import train as stage_one
    from tests.conftest import TINY_MODEL

    stage_one.main(["--run-dir", str(tmp_path / "run"), *TINY_MODEL, "--max-steps", "30", "--disc-start", "-1", "--no-dump"])
    said = capsys.readouterr()
    assert "stage one: about" in said.out + said.err
    assert "left for steps 26-30" in said.out + said.err and "--max-steps 15 halves it" in said.out + said.err
