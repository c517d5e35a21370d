"""What a resume does when the run length changes (``resume_policy``): the LR never jumps silently.

A schedule is a function of the step and the run length; rebuilt for a new ``max_steps`` it would move the LR at
the resume point (a cosine over 600 steps stretched to 3,000 jumps from its tail back towards its peak). So a
changed length is refused by default, with both LRs in the message, or follows the policy the user chose:

- ``keep_schedule``: the schedule keeps the length it was planned for; past its end the LR stays at its final value.
- ``new_decay``: from the resume point a cosine decay runs from the current LR down to the schedule's final LR at
  the new ``max_steps``. The decay is recorded in the checkpoint (``TrainState.decays``), so later resumes rebuild
  the same schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keel import schedules
from keel.errors import KeelError
from keel.timeunits import Time, Timeline


def build_schedule(config, timeline: Timeline, total_steps: int, decays: list) -> Any:
    """The run's schedule built for ``total_steps``, then each new decay added on resume: from ``start`` the LR
    falls from its value there to the schedule's final value by ``end`` (cosine). ``timeline`` resolves lengths
    in time units (``keel.timeunits``)."""
    base_lr = float(config.optimizer.lr)
    if total_steps != timeline.total_steps:  # planned for another length: shares of the run are of that one
        timeline = timeline.with_duration(Time.steps(total_steps))
    schedule = schedules.from_config(config.schedule, base_lr=base_lr, key="schedule", timeline=timeline)
    previous_end = total_steps
    for start, end in decays:
        final = schedule(max(previous_end - 1, 0))
        decay = schedules.cosine_decay(schedule(start), max(end - start, 1), min_lr=min(final, schedule(start)))
        schedule, previous_end = schedules.join([schedule, decay], [start]), end
    return schedule


def resume_schedule(config, timeline: Timeline, state, say: Callable[[str], None]) -> Any | None:
    """The schedule a resumed run continues with, or None when the one built for ``config`` is already right.

    ``state`` is the restored ``TrainState`` (``schedule_steps``, ``decays``, ``step``); ``new_decay`` appends to
    ``state.decays``. Refusing raises ``KeelError`` before anything is written.
    """
    new_total = timeline.total_steps  # the run length now, in steps
    old_total = state.schedule_steps or new_total
    planned_end = state.decays[-1][1] if state.decays else old_total
    if planned_end == new_total:
        if old_total != new_total or state.decays:
            return build_schedule(config, timeline, old_total, state.decays)
        return None
    at = state.step
    kept = build_schedule(config, timeline, old_total, state.decays)
    stretched = build_schedule(config, timeline, new_total, [])
    policy = config.resume_policy
    before = kept(max(at - 1, 0))
    if policy == "refuse":
        raise KeelError(
            f"{_length_key(config)}: {config.run_length} ({new_total} steps) on resume, but the run was planned for {planned_end} steps: rebuilt "
            f"for the new length the schedule would move the LR at step {at} from {kept(at):.3e} to "
            f"{stretched(at):.3e}; allowed: resume_policy=keep_schedule (the schedule keeps its length; past "
            f"step {planned_end} the LR stays at {kept(planned_end):.3e}) or resume_policy=new_decay (a new "
            f"decay from the current LR to {kept(planned_end):.3e} at step {new_total}), or the old "
            f"max_steps={planned_end}")
    if policy == "new_decay":
        state.decays = [*state.decays, [at, new_total]]
    schedule = build_schedule(config, timeline, old_total, state.decays)
    say(f"resume_policy {policy}: max_steps {planned_end} -> {new_total}; LR at step {max(at - 1, 0)} "
        f"(before the resume point) {before:.3e}, at step {at} {schedule(at):.3e}, at the end "
        f"{schedule(new_total - 1):.3e}")
    return schedule


def _length_key(config) -> str:
    return "max_steps" if config.duration is None else "duration"
