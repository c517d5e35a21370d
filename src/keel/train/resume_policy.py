"""What a resume does when the run length changes (``resume_policy``): the LR never jumps silently.

A schedule is a function of the step and the run length; rebuilt for a new run length it would move the LR at
the resume point (a cosine over 600 steps stretched to 3,000 jumps from its tail back towards its peak). So a
changed length is refused by default, with both LRs in the message, or follows the policy the user chose:

- ``keep_schedule``: the schedule keeps the length it was planned for; past its end the LR stays at its final value.
  A schedule that ends at 0 (wsd, a cosine to 0) would train the whole extension at LR 0, changing nothing: that is
  refused, naming ``new_decay``.
- ``new_decay``: from the resume point a cosine decay runs down to the schedule's final LR at the new run
  length's end. It starts from the current LR; from ``resume_peak_lr`` when that is set; and, where the current LR
  is 0 (a finished run whose schedule ended at 0: extending it is what "train longer" means), from the schedule's
  peak. A start above the current LR is reached by a linear warmup of ``resume_warmup`` steps (default: the
  schedule's own warmup, at most half the extension): re-warming then re-decaying, as continual pre-training does
  (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large Language Models"). The
  decay is recorded in the checkpoint (``TrainState.decays``: ``[start, end]``, or ``[start, end, peak, warmup]``),
  so later resumes rebuild the same schedule whatever the config says then.

Whatever the policy, an extension that changes nothing at the resume point (a constant schedule, or a resume
during a warmup given in steps) is accepted: the schedule is rebuilt for the new length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from keel import schedules
from keel.errors import KeelError
from keel.timeunits import Time, Timeline


def build_schedule(config, timeline: Timeline, total_steps: int, decays: list) -> Any:
    """The run's schedule built for ``total_steps``, then each new decay added on resume: from ``start`` the LR
    goes from its value there (or up to ``peak`` over ``warmup`` steps) down to the schedule's final value by
    ``end`` (cosine). ``timeline`` resolves lengths in time units (``keel.timeunits``)."""
    base_lr = float(config.optimizer.lr)
    if total_steps != timeline.total_steps:  # planned for another length: shares of the run are of that one
        timeline = timeline.with_duration(Time.steps(total_steps))
    schedule = schedules.from_config(config.schedule, base_lr=base_lr, key="schedule", timeline=timeline)
    previous_end = total_steps
    for record in decays:
        start, end = int(record[0]), int(record[1])
        peak, warm = (float(record[2]), int(record[3])) if len(record) > 2 else (None, 0)
        # down to the LR the schedule ended with: at its last step for a [start, end] record (as first written),
        # at its end for a restart from a peak (a wsd or a cosine to 0 reaches 0 only there)
        final = schedule(previous_end if peak is not None else max(previous_end - 1, 0))
        current = schedule(start)
        top = current if peak is None else peak
        decay = schedules.cosine_decay(top, max(end - start - warm, 1), min_lr=min(final, top))
        if warm:
            decay = schedules.warmup(decay, warm, init_lr=current)
        schedule, previous_end = schedules.join([schedule, decay], [start]), end
    return schedule


def schedule_peak(config) -> float:
    """The schedule's peak LR: ``schedule.lr`` when it sets one, else ``optimizer.lr``."""
    spec = config.schedule
    if isinstance(spec, str):
        spec = schedules.parse_spec(spec)
    peak = spec.get("lr") if isinstance(spec, dict) else None
    return float(peak if peak is not None else config.optimizer.lr)


def resume_schedule(config, timeline: Timeline, state, say: Callable[[str], None]) -> Any | None:
    """The schedule a resumed run continues with, or None when the one built for ``config`` is already right.

    ``state`` is the restored ``TrainState`` (``schedule_steps``, ``decays``, ``step``); ``new_decay`` appends to
    ``state.decays``, an accepted unchanged extension sets ``state.schedule_steps``. Refusing raises ``KeelError``
    before anything is written.
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
    if not state.decays and all(math.isclose(kept(s), stretched(s), rel_tol=1e-12, abs_tol=0.0)
                                for s in {max(at - 1, 0), at}):
        state.schedule_steps = new_total
        say(f"{_change(config, planned_end, new_total)}: the schedule built for the new length gives the same LR "
            f"at step {at} ({stretched(at):.3e}); continuing with it")
        return stretched
    end_lr = kept(max(planned_end, at))
    if policy == "refuse":
        raise KeelError(
            f"{_length_key(config)}: {config.run_length} ({new_total} steps) on resume, but the run was planned "
            f"for {planned_end} steps: rebuilt "
            f"for the new length the schedule would move the LR at step {at} from {kept(at):.3e} to "
            f"{stretched(at):.3e}; allowed: resume_policy=keep_schedule (the schedule keeps its length; past "
            f"step {planned_end} the LR stays at {end_lr:.3e}) or resume_policy=new_decay (a new "
            f"decay from {_decay_start(config, kept(at))} to {end_lr:.3e} at step {new_total}), or the old "
            f"{_length(config, planned_end)}")
    if policy == "keep_schedule" and new_total > planned_end and end_lr == 0:
        raise KeelError(
            f"resume_policy: keep_schedule keeps the schedule planned for {planned_end} steps, which ends at LR 0: "
            f"steps {max(planned_end, at)} to {new_total} would train at LR 0 and change nothing; allowed: "
            f"resume_policy=new_decay (a new decay from {_decay_start(config, kept(at))}; resume_peak_lr and "
            f"resume_warmup set it), or {_length(config, planned_end)}")
    if policy == "new_decay":
        state.decays = [*state.decays, _new_decay(config, timeline, kept, at, say)]
    schedule = build_schedule(config, timeline, old_total, state.decays)
    say(f"resume_policy {policy}: {_change(config, planned_end, new_total)}; LR at step {max(at - 1, 0)} "
        f"(before the resume point) {before:.3e}, at step {at} {schedule(at):.3e}, at the end "
        f"{schedule(new_total - 1):.3e}")
    return schedule


def _decay_start(config, current: float) -> str:
    if config.resume_peak_lr is not None:
        return f"resume_peak_lr {config.resume_peak_lr:.3e}"
    if current > 0:
        return f"the current LR {current:.3e}"
    return f"the schedule's peak {schedule_peak(config):.3e} (the current LR is 0)"


def _new_decay(config, timeline: Timeline, kept, at: int, say: Callable[[str], None]) -> list:
    """The record of the decay ``new_decay`` adds at step ``at``: ``[at, max_steps]`` from the current LR, or
    ``[at, max_steps, peak, warmup]`` from another peak."""
    current, end = kept(at), timeline.total_steps
    peak = config.resume_peak_lr
    if peak is None and current > 0:
        return [at, end]
    if peak is None:
        peak = schedule_peak(config)
        say(f"resume_policy new_decay: the LR is 0 at step {at} (the schedule ended there), so the new decay "
            f"restarts from the schedule's peak {peak:.3e} (set resume_peak_lr for another)")
    length = end - at
    if config.resume_warmup is not None:
        warm = timeline.with_duration(Time.steps(end)).steps(config.resume_warmup, "resume_warmup")
        if warm >= length:
            raise KeelError(f"resume_warmup: {config.resume_warmup!r} is {warm} steps, and the extension from step "
                            f"{at} to {_end(config, end)} has {length}; allowed: fewer steps than the extension")
    elif peak > current:
        warm = min(schedules.warmup_steps(kept), length // 2)
    else:
        warm = 0
    return [at, end, float(peak), int(warm)]


def _length_key(config) -> str:
    return "max_steps" if config.duration is None else "duration"


# Messages name the run length the way the user gave it: max_steps, or duration (in any unit, which takes steps too).


def _length(config, steps: int) -> str:
    """A run length of ``steps`` steps, to set: ``max_steps=40``, or ``duration=40 (steps)``."""
    return f"max_steps={steps}" if config.duration is None else f"duration={steps} (steps)"


def _change(config, planned_end: int, new_total: int) -> str:
    """The run length now against the one the schedule was planned for: ``max_steps 40 -> 80``, or
    ``duration 20ktok (40 -> 80 steps)``."""
    if config.duration is None:
        return f"max_steps {planned_end} -> {new_total}"
    return f"duration {config.duration} ({planned_end} -> {new_total} steps)"


def _end(config, end: int) -> str:
    """The end of the run: ``max_steps 80``, or ``step 80 (duration 20ktok)``."""
    return f"max_steps {end}" if config.duration is None else f"step {end} (duration {config.duration})"
