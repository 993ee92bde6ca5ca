"""How long a stage will take on this machine, said early enough to change course.

After a few timed optimizer steps the loop prints the time left at that pace and what halves
it; where a stage changes pace on purpose (stage one's discriminator starting), it asks for a
second estimate a few steps after the change.
"""

import time
from collections import deque

TIMED_STEPS = 20  # steps averaged for an estimate, after the first few (warm-up, compilation, caches)
FIRST_AFTER = 5  # steps not counted at the start of a run or of a new pace


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class TimeLeft:
    """`step_done(step)` after each optimizer step returns a line to print when an estimate is
    due, else None; `resume()` after an evaluation or a checkpoint restarts the clock, so that
    they are not counted as a step's time."""

    def __init__(self, start_step: int, total_steps: int, hint: str = "", also_at: tuple[int, ...] = ()):
        self.total, self.hint = total_steps, hint
        self.changes = sorted(s for s in also_at if s > start_step)
        self.due = sorted({start_step + FIRST_AFTER + TIMED_STEPS, *(s + FIRST_AFTER + TIMED_STEPS for s in self.changes)})
        self.durations: deque[float] = deque(maxlen=TIMED_STEPS)
        self.clock = time.perf_counter()

    def resume(self) -> None:
        self.clock = time.perf_counter()  # evaluation and checkpoints are not steps

    def step_done(self, step: int) -> str | None:
        now = time.perf_counter()
        self.durations.append(now - self.clock)
        self.clock = now
        if not self.due or step < self.due[0] or step >= self.total:
            return None
        self.due = [s for s in self.due if s > step]
        per_step = sum(self.durations) / len(self.durations)
        left = per_step * (self.total - step)
        change = next((s for s in self.changes if s > step), None)
        # a pace that will change is not the whole story: say where, so the first figure is not taken as final
        until = f" (the pace until step {change}, where it changes; said again after)" if change is not None and change < self.total else ""
        return (f"about {format_duration(left)} left for steps {step + 1}-{self.total} at {per_step * 1000:.0f} ms a step "
                f"on this machine{until}{'; ' + self.hint if self.hint else ''}")
