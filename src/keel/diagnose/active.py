"""``keel diagnose --config CONFIG``: the active procedures, each a few short trainings through the normal trainer.

In order, within a time budget (default 15 minutes; each procedure's length is scaled to what is left, never
below its minimum):

1. Sanity checks (the training-dynamics notes, Karpathy's "A Recipe for Training Neural Networks"): the loss at
   initialisation against ln(C) for C classes or vocabulary entries (keel's weight decay is decoupled and never
   enters the loss, so this is the data loss alone, as the notes ask); overfitting one small batch: the loss must
   approach zero (below 5% of its initial value) within the step limit.
2. Your config, as it is, for its first steps: whether it trains stably (it is flagged ``unstable_config``
   otherwise), with its gradient norms and update-to-weight ratios.
3. LR range test (Smith 2017): one run with an exponentially rising LR, the loss smoothed; a hint only (LR
   finders are biased towards the start LR: Lightning issues #2814, #21141). Then the LR sweep the notes prescribe:
   constant LRs 1e-1, 1e-2, 1e-3, 1e-4 (extended by a decade while the best sits at an edge), refined half a decade
   either side of the best; lr* is the vertex of a parabola through the best three in log LR, with an interval.
   Runs that produce NaN or blow up are infeasible (the Tuning Playbook's Figure 7a).
4. Instability probe (Playbook FAQ): a run at 2x lr* evaluated at every step (early instability that a normal
   evaluation cadence steps over), and runs at 5x and 10x lr* looked at for a sudden jump after a steady fall.
5. Warmup search (Playbook FAQ): ramp 0 -> base LR over ``w`` steps, then ``2 w`` steps at it, for ``w`` in
   {10, 100, 1000, 10000} up to 10% of the run; the shortest that trains stably is found. Base LRs: your config's
   LR when your config is unstable, then the Playbook's 10x and 100x the lowest unstable LR found. Then the
   comparison: each warmup found for an LR above yours, prepended to your config (``max_steps`` grows by it),
   against your config as it is, by best checkpoint (the lowest validation loss of each, not the last).
6. ``recommended.yaml`` (validated, so ``keel train`` accepts it as is): a warmup that unlocks a better, higher LR;
   for an unstable config the warmup its LR needs (or lr*) and a clip (``clip_harder`` when it clipped already);
   a warmup over 5% of the run is said so (``lengthen_run``). When the budget allows, a check that the
   recommended config trains stably for as many steps as step 2 ran.

``schedule="constant"`` (``--schedule constant``) runs everything at a constant LR after your warmup, the
training-dynamics notes' "start with a constant LR, tune the schedule last", and recommends it so.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keel import tasks
from keel.config import set_dotted
from keel.diagnose import signals
from keel.diagnose.clipping import clip_harder, clipping_from
from keel.diagnose.findings import Diagnosis, Finding, write_recommended
from keel.diagnose.probes import (Display, LRRangeCallback, ProbeResult, ProbeTask, ProbeWatch, read_probe,
                                  take_examples, tidy_probe_dir)
from keel.diagnose.run import RunRecords, _round, gradient_norms, update_ratios
from keel.errors import KeelError, TrainingUnstableError

DEFAULT_BUDGET = "15m"
SWEEP_GRID = (1e-1, 1e-2, 1e-3, 1e-4)
WARMUPS = (10, 100, 1000, 10000)
WARMUP_FACTORS = (10, 100)  # base LRs of the warmup search, x the lowest unstable LR (the Playbook's FAQ)
RANGE_LRS = (1e-5, 10.0)
OVERFIT_FRACTION = 0.05  # "approaches zero": below 5% of the initial loss
INITIAL_LOSS_TOLERANCE = 0.1  # |L0 - ln C| <= 10% of ln C


@dataclass
class Plan:
    """Ideal and minimum lengths (optimizer steps) of the procedures; the budget scales each between the two."""

    overfit_steps: tuple[int, int] = (150, 60)
    overfit_examples: int = 4
    config_steps: tuple[int, int] = (200, 20)
    range_steps: tuple[int, int] = (100, 30)
    sweep_steps: tuple[int, int] = (100, 20)
    instability_steps: tuple[int, int] = (500, 40)
    jump_steps: tuple[int, int] = (100, 20)
    val_batches: int = 4
    initial_batches: int = 4
    verify: bool = True


def parse_budget(text: str | float | int) -> float:
    """'15m', '90s', '1h', '1m30s' or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", value)
        if not value or parts is None or not any(parts.groups()):
            raise KeelError(f"--budget: {text!r} is not a duration; allowed: seconds (900), '90s', '15m', '1h', "
                            "'1m30s'")
        hours, minutes, secs = (float(g) if g else 0.0 for g in parts.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not seconds > 0:
        raise KeelError(f"--budget: {text!r}; allowed: a duration above 0")
    return seconds


SCHEDULE_CHOICES = ("config", "constant")
_WARMUP_KEYS = ("warmup", "warmup_init_lr", "warmup_shape")


def constant_schedule(schedule: dict[str, Any]) -> dict[str, Any]:
    """``schedule`` (a config's ``schedule:`` block) as a constant LR after the same warmup."""
    kept = {key: schedule[key] for key in _WARMUP_KEYS if key in schedule}
    if schedule.get("name") == "warmup" and "steps" in schedule:  # the warmup combinator: its length
        kept["warmup"] = schedule["steps"]
    return {"name": "constant", **kept}


PROBE_SETTINGS: dict[str, Any] = {
    "checkpoint_interval": 10**9, "keep_last": 1, "log_interval": 1, "sample.tokens": 0, "tensorboard": False,
    "spike.enabled": False, "nonfinite.max_consecutive_skips": 3, "early_stopping.patience": None,
    "ema.enabled": False, "polyak.enabled": False, "swa.enabled": False, "snapshot.enabled": False,
    "diagnostics.update_ratio_every": None, "out_dir": None,
}


def probe_settings(config: Any) -> dict[str, Any]:
    """``PROBE_SETTINGS`` that apply to ``config``: a block its task does not own (a digits run has no ``sample``)
    is left out."""
    blocks = {*type(config).model_fields, *(config.model_extra or {})}
    return {key: value for key, value in PROBE_SETTINGS.items() if key.split(".")[0] in blocks}


class Session:
    """One ``keel diagnose --config`` run: the procedures in order, the budget, the findings."""

    def __init__(self, raw: dict[str, Any], out_dir: Path, budget: float, *, target: str = "config",
                 plan: Plan | None = None, display: Display | None = None, threads: int | None = 1,
                 schedule: str = "config"):
        from keel.config import validate

        if schedule not in SCHEDULE_CHOICES:
            raise KeelError(f"--schedule: {schedule!r}; allowed: {', '.join(SCHEDULE_CHOICES)}")
        raw = copy.deepcopy(raw)
        self.schedule_replaced: dict[str, Any] | None = None
        if schedule == "constant":  # the notes: a constant LR first, the schedule tuned last
            self.schedule_replaced = dict(validate(raw).schedule)
            raw["schedule"] = constant_schedule(self.schedule_replaced)
        self.raw = copy.deepcopy(raw)
        self.threads_note = ""
        if self.raw.get("threads") is None and threads is not None:
            self.raw["threads"] = threads  # probes only: recommended.yaml keeps the config's own setting
            self.threads_note = f" (threads {threads}: the config sets none)"
        self.user_raw = copy.deepcopy(raw)
        self.config = validate(self.raw)
        if self.config.max_steps is None:
            raise KeelError(f"duration: {self.config.duration!r}: keel diagnose plans its probes in steps; allowed: "
                            "the run length as max_steps")
        self.out = Path(out_dir)
        self.plan = plan or Plan()
        self.display = display or Display()
        self.budget = budget
        self.started = time.perf_counter()
        self.deadline = self.started + budget
        self.diagnosis = Diagnosis("config", target)
        self.timings = self.diagnosis.timings
        self.results: dict[str, Any] = {}
        self.step_seconds = math.nan
        self.small_step_seconds = math.nan
        self.eval_seconds = math.nan
        self.overhead = 2.0
        self._count = 0
        self.ready = False  # setup finished: from here on a partial diagnosis is written
        self.changes: dict[str, Any] = {}
        self.notes: list[str] = []
        if self.schedule_replaced is not None:
            self.notes = [f"--schedule constant: the schedule of your config, {json.dumps(self.schedule_replaced)}, "
                          "is replaced by a constant LR", "after its warmup; tune the schedule last, once the rest is "
                          "settled (docs/schedules.md, 'Start constant, tune the schedule last')"]

    # ------------------------------------------------------------------------------------------ budget

    def left(self) -> float:
        return self.deadline - time.perf_counter() - 3.0  # kept for writing the outputs

    def ideal_costs(self) -> dict[str, float]:
        """Seconds each procedure would take at its ideal length, at the step and evaluation times measured so far
        (the warmup search at its longest: every candidate warmup w run for 3w steps, at 10x and 100x the lowest
        unstable LR; the comparison: a config run's length at each)."""
        p, s, e, o = self.plan, self.step_seconds, self.eval_seconds, self.overhead
        small = self.small_step_seconds if math.isfinite(self.small_step_seconds) else 0.3 * s
        config_steps = min(self.config.max_steps, p.config_steps[0])
        cap = int(0.1 * self.config.max_steps)
        warmups = len(WARMUP_FACTORS) * sum(3 * w * s + o for w in WARMUPS if w <= cap)
        return {"overfit": p.overfit_steps[0] * small + o,
                "config": config_steps * s + 4 * p.val_batches * e + o,
                "range": p.range_steps[0] * s + e + o,
                "sweep": (len(SWEEP_GRID) + 3) * (p.sweep_steps[0] * s + p.val_batches * e + o),
                "instability": p.instability_steps[0] * (s + e) + o,
                "jumps": 2 * (p.jump_steps[0] * s + e + o),
                "warmup": warmups,
                "compare": len(WARMUP_FACTORS) * (config_steps * s + 4 * p.val_batches * e + o),
                "verify": config_steps * s + o if p.verify else 0.0}

    def steps_for(self, procedure: str, ideal_min: tuple[int, int], per_step: float, runs: int = 1,
                  evals_per_run: float = 1.0) -> int | None:
        """Steps per run for ``procedure``: its ideal length scaled by the share of the time left that its ideal
        cost is of the ideal cost of every procedure still to come, never below its minimum (None: not even the
        minimum fits in the time left)."""
        ideal, minimum = ideal_min
        costs = self.ideal_costs()
        order = list(costs)
        coming = sum(costs[name] for name in order[order.index(procedure):])
        share = costs[procedure] / max(coming, 1e-9)
        fixed = runs * (self.overhead + evals_per_run * self.plan.val_batches * self.eval_seconds)
        available = self.left()
        if available < fixed + runs * minimum * per_step:
            return None
        allotted = max(share * available - fixed, runs * minimum * per_step)
        return int(max(minimum, min(ideal, allotted / max(runs * per_step, 1e-9))))

    # ------------------------------------------------------------------------------------------ probes

    def probe_config(self, steps: int, overrides: dict[str, Any], eval_interval: int | None = None,
                     keep_length: bool = False):
        """The config a probe trains: the user's, with the probe settings and ``overrides`` (dotted keys), ``steps``
        long (unless ``keep_length``), evaluated every ``eval_interval`` steps (default: at its end)."""
        from keel.config import validate

        raw = copy.deepcopy(self.raw)
        for key, value in {**probe_settings(self.config), **overrides}.items():
            set_dotted(raw, key, value)
        if not keep_length:
            raw["max_steps"] = steps
        raw["eval_interval"] = eval_interval or max(steps, 1)
        return validate(raw)

    def probe(self, name: str, *, steps: int, overrides: dict[str, Any], lr: float | None, task: ProbeTask,
              step_limit: int | None = None, callbacks: tuple = (), eval_interval: int | None = None,
              time_limit: float | None = None, done: Callable[[float], bool] | None = None,
              keep_length: bool = False) -> ProbeResult:
        """Train ``steps`` updates of the config with ``overrides`` (dotted keys) through the trainer, in
        ``OUT/probes/NN-name``; instability ends the probe and is recorded."""
        from keel.train import Trainer

        self._count += 1
        run_dir = self.out / "probes" / f"{self._count:02d}-{name}"
        config = self.probe_config(steps, overrides, eval_interval, keep_length)
        total = step_limit or steps
        if time_limit is None:
            time_limit = max(10.0, 2.0 * total * self.step_seconds) if math.isfinite(self.step_seconds) else 1e9
        time_limit = max(1.0, min(time_limit, self.left()))  # never past the budget
        watch = ProbeWatch(task, name, total, self.display, step_limit=step_limit, time_limit=time_limit, done=done)
        started = time.perf_counter()
        unstable = None
        try:
            Trainer(config, callbacks=[watch, *callbacks], run_dir=run_dir, quiet=True, task=task).fit()
        except TrainingUnstableError as error:
            unstable = str(error).splitlines()[0]
        result = read_probe(name, lr, total, run_dir)
        result.wall = time.perf_counter() - started
        result.unstable_error = unstable is not None
        result.blew_up, result.reached = watch.blew_up, watch.reached
        result.stopped = unstable or watch.reason
        tidy_probe_dir(run_dir)
        measured = result.step_seconds()
        if measured is not None and task.one_batch is None and config.eval_interval.amount >= 10:
            # a step record's time does not include evaluations, but the gap to the next one does
            self.step_seconds = measured
            self.overhead = max(0.5, min(30.0, result.wall - len(result.steps) * measured
                                         - len(result.evals) * self.eval_seconds * task.val_batches))
        return result

    def task(self, **options) -> ProbeTask:
        return ProbeTask(self.base, self.pristine, **{"val_batches": self.plan.val_batches, **options})

    # ------------------------------------------------------------------------------------------ the procedures

    def run(self) -> Diagnosis:
        self.out.mkdir(parents=True, exist_ok=True)
        stages = [("setup", self.setup), ("sanity checks", self.sanity), ("config run", self.config_run),
                  ("LR range test", self.range_test), ("LR sweep", self.sweep),
                  ("instability probe", self.instability), ("warmup search", self.warmup_search),
                  ("warmup comparison", self.compare_warmups), ("recommended config", self.recommend)]
        for name, stage in stages:
            began = time.perf_counter()
            try:
                stage()
            finally:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began
        return self.diagnosis

    def setup(self) -> None:
        """Build the task and the initial model once; time one forward and backward pass and one evaluation."""
        from keel.train.loop import resolve_device

        config = self.config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.base = tasks.from_config(config)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.pristine = tasks.check_model(self.base.build_model(), f"task {config.task!r}")
        self.device = resolve_device(config.device)
        model = copy.deepcopy(self.pristine).to(self.device)
        model.eval()
        total, count, times = 0.0, 0, []
        with torch.no_grad():
            for index in range(self.plan.initial_batches):
                began = time.perf_counter()
                batch = tasks.move_to_device(self.base.train_batch(index), self.device)
                total += float(self.base.loss(model, batch))
                count += self.base.count(batch)
                times.append(time.perf_counter() - began)
        self.eval_seconds = min(times[1:] or times)  # the first call pays for warming up
        self.initial_loss = total / max(count, 1)
        model.train()
        batch = tasks.move_to_device(self.base.train_batch(0), self.device)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            (self.base.loss(model, batch) / self.base.count(batch)).backward()
            times.append(time.perf_counter() - began)
        self.step_seconds = 1.3 * min(times[1:]) + 0.01  # forward + backward, plus the update and logging
        del model
        self.display.line(f"setup: task {config.task}, {sum(p.numel() for p in self.pristine.parameters()):,} "
                          f"parameters; one step ~{self.step_seconds:.3f} s, one evaluation batch "
                          f"~{self.eval_seconds:.3f} s{self.threads_note}; budget {self.budget:.0f} s")
        minimum = 2 * self.overhead + (self.plan.overfit_steps[1] * 0.5 + self.plan.config_steps[1]) * self.step_seconds
        if self.left() < minimum:
            raise KeelError(f"--budget {self.budget:g}s is too small to run anything: the sanity checks and the "
                            f"config run need at least {math.ceil(minimum + 3)} s here (one step ~"
                            f"{self.step_seconds:.3f} s); allowed: --budget {math.ceil(minimum + 3)} or more "
                            f"(default {DEFAULT_BUDGET})")
        self.ready = True

    def sanity(self) -> None:
        expected = tasks.expected_initial_loss(self.base)
        n = self.base.num_classes
        if expected is None:
            self.diagnosis.skip("initial loss", "the task does not say how many classes it predicts",
                                "Task.num_classes", bad_input=False)
        else:
            difference = self.initial_loss - expected
            passed = abs(difference) <= INITIAL_LOSS_TOLERANCE * expected
            evidence = {"initial_loss": self.initial_loss, "expected_ln_C": expected, "num_classes": n,
                        "difference": difference, "batches": self.plan.initial_batches, "step": 0,
                        "weight_decay": "decoupled, not in the loss"}
            self.diagnosis.add(Finding(
                "initial_loss", "info" if passed else "warning",
                f"initial loss {self.initial_loss:.4f} vs ln({n}) = {expected:.4f}: "
                f"{'pass' if passed else 'fail'} (tolerance {INITIAL_LOSS_TOLERANCE:.0%})", evidence,
                "none: the model starts from a uniform prediction" if passed else
                ("the model starts confidently wrong: initialise the output layer so the logits start near 0 (a "
                 "uniform prediction), and check that the loss averages over targets"
                 if difference > 0 else "the initial loss is below chance: check the loss and whether labels leak "
                 "into the inputs")))
            self.display.line(f"sanity: initial loss {self.initial_loss:.4f} vs ln({n}) = {expected:.4f}: "
                              f"{'pass' if passed else 'FAIL'}")
        self.overfit_one_batch()

    def overfit_one_batch(self) -> None:
        examples = min(self.plan.overfit_examples, tasks.batch_examples(self.base.train_batch(0)))
        batch = take_examples(self.base.train_batch(0), examples)
        fraction = min(1.0, max(0.1, examples / max(1, tasks.batch_examples(self.base.train_batch(0)))))
        per_step = self.step_seconds * max(0.3, fraction)
        steps = self.steps_for("overfit", self.plan.overfit_steps, per_step)
        if steps is None:
            self.diagnosis.skip("overfit one batch", "the budget left is too small",
                                f"{self.plan.overfit_steps[1]} steps", bad_input=False)
            return
        lr = float(self.config.optimizer.lr)
        overrides = {"schedule": {"name": "constant"}, "grad_accum": 1}
        if self._accepts(self.config.optimizer, "weight_decay"):
            overrides["optimizer.weight_decay"] = 0.0
        attempts = []
        for attempt_lr in (lr, lr / 10):
            task = self.task(one_batch=batch, val_batches=1)
            start_loss: list[float] = []

            def done(loss: float, start=start_loss) -> bool:
                if not start:
                    start.append(loss)
                return loss < OVERFIT_FRACTION * start[0]

            result = self.probe("overfit-one-batch", steps=steps, lr=attempt_lr, task=task, done=done,
                                overrides={**overrides, "optimizer.lr": attempt_lr},
                                time_limit=max(10.0, 3 * steps * per_step))
            self.small_step_seconds = result.step_seconds() or per_step
            attempts.append(result)
            if result.reached or not result.diverged:
                break
        result = attempts[-1]
        finite = [v for v in result.losses if math.isfinite(v)]
        first, last = (finite[0], finite[-1]) if finite else (math.nan, math.nan)
        threshold = OVERFIT_FRACTION * first if math.isfinite(first) else math.nan
        evidence = {"examples": examples, "lr": result.lr, "steps_run": len(result.steps), "step_limit": steps,
                    "loss_first": first, "loss_last": last, "threshold": threshold,
                    "weight_decay": overrides.get("optimizer.weight_decay", "unchanged")}
        if len(attempts) > 1:
            evidence["first_attempt"] = {"lr": attempts[0].lr, "stopped": attempts[0].stopped}
        self.results["overfit"] = result.summary()
        if result.reached:
            self.diagnosis.add(Finding(
                "overfit_one_batch", "info",
                f"overfit one batch of {examples} examples: loss {first:.4f} -> {last:.4f} in {len(result.steps)} "
                f"steps (below 5% of the start): pass", evidence, "none: the model and loss can learn"))
        else:
            self.diagnosis.add(Finding(
                "overfit_one_batch", "warning",
                f"overfit one batch of {examples} examples: loss {first:.4f} -> {last:.4f} after "
                f"{len(result.steps)} steps, not below {threshold:.4f}: fail"
                + (f" ({result.stopped})" if result.stopped and not result.stopped.startswith("step") else ""),
                evidence, "a model that cannot memorise a few examples has a bug or too little capacity: check the "
                "loss, the labels and the model; or allow more steps (a larger --budget)"))
        self.display.line(f"sanity: overfit one batch of {examples}: {first:.4f} -> {last:.4f} in "
                          f"{len(result.steps)} steps: {'pass' if result.reached else 'FAIL'}")

    def config_run(self) -> None:
        """The user's config as it is, for its first steps."""
        ideal = (min(self.config.max_steps, self.plan.config_steps[0]),
                 min(self.config.max_steps, self.plan.config_steps[1]))
        steps = self.steps_for("config", ideal, self.step_seconds, evals_per_run=4)
        if steps is None:
            self.diagnosis.skip("config run", "the budget left is too small", f"{ideal[1]} steps", bad_input=False)
            return
        every = max(1, steps // 100)
        result = self.probe("config", steps=self.config.max_steps, step_limit=steps, lr=None, task=self.task(),
                            overrides={"diagnostics.update_ratio_every": every}, keep_length=True,
                            eval_interval=max(1, steps // 4))
        self.config_result, self.config_steps = result, steps
        early = max(10, signals.warmup_end(result.lrs), steps // 10)
        stability = result.stability(early_steps=early)
        self.config_stability = stability
        self.results["config"] = {**result.summary(), "status": stability.status}
        lr = float(self.config.optimizer.lr)
        schedule = dict(self.config.schedule)
        evidence = {"steps_run": len(result.steps), "lr": lr, "schedule": schedule.get("name"),
                    "warmup": schedule.get("warmup", 0), **stability.evidence}
        if stability.stable:
            self.diagnosis.add(Finding(
                "config_stable", "info", f"your config trained stably for {len(result.steps)} steps: "
                f"{stability.message}", evidence, "none"))
        else:
            kind = "early" if stability.early else "sudden"
            self.diagnosis.add(Finding(
                "unstable_config", "error",
                f"your config is unstable ({kind}): {stability.message}", evidence,
                "see the warmup search below; the Playbook's remedies: warmup, gradient clipping at the 90th "
                "percentile of gradient norms, a lower LR, another optimizer, or for keel's GPT "
                "model.norm_position residual / model.zero_init_residual true"))
        records = RunRecords(result.records)
        if len(records.norms) >= 10:
            context = {"config": self.config, "planned_steps": self.config.max_steps,
                       "last_step": result.steps[-1] if result.steps else 0, "baseline": None}
            before = len(self.diagnosis.findings)
            gradient_norms(self.diagnosis, records, context)
            update_ratios(self.diagnosis, records, context, warn=False)  # early steps only: high ratios are normal
            for finding in self.diagnosis.findings[before:]:
                if finding.kind == "clipping_most_updates":
                    # The first steps have the largest gradients: a threshold for the whole run needs a whole run
                    # (keel diagnose RUN_DIR); applied below only when the config is unstable.
                    finding.severity, finding.changes = "info", {}
                    finding.message += f" (the first {len(records.norms)} steps only)"
            self.diagnosis.skipped = [s for s in self.diagnosis.skipped if s.procedure != "update ratios"]
        if stability.status in ("diverged", "jump", "early") and stability.step is not None:
            if stability.step >= clipping_from(self.config.clip, result.lrs, result.steps):
                self.clip_finding = clip_harder(self.config.clip, result.norms, lr,
                                                [{"step": stability.step, "event": stability.status}])
                self.diagnosis.add(self.clip_finding)
        self.display.line(f"config run: {len(result.steps)} steps of your config: "
                          f"{'stable' if stability.stable else 'UNSTABLE: ' + stability.message}")

    def range_test(self) -> None:
        steps = self.steps_for("range", self.plan.range_steps, self.step_seconds)
        if steps is None:
            self.diagnosis.skip("LR range test", "the budget left is too small", f"{self.plan.range_steps[1]} steps",
                                bad_input=False)
            return
        low, high = RANGE_LRS
        callback = LRRangeCallback(low, high, steps)
        smoothed_min: list[float] = []
        beta = 1 - 1 / max(5.0, steps / 10)
        state = {"average": 0.0, "n": 0}

        def done(loss: float) -> bool:  # stop once the smoothed loss is twice its minimum (a blow-up)
            state["n"] += 1
            state["average"] = beta * state["average"] + (1 - beta) * loss
            value = state["average"] / (1 - beta ** state["n"])
            smoothed_min.append(min(value, smoothed_min[-1]) if smoothed_min else value)
            return state["n"] > 5 and value > 2 * smoothed_min[-1]

        result = self.probe("lr-range", steps=steps, lr=None, task=self.task(val_batches=1), callbacks=(callback,),
                            overrides={"schedule": {"name": "constant"}}, done=done)
        pairs = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if math.isfinite(loss) and lr > 0]
        if len(pairs) < 5:
            self.diagnosis.add(Finding("lr_range_test", "warning", "the LR range test diverged within 5 steps",
                                       {"steps_run": len(pairs), "lr_min": low}, "the sweep below decides"))
            return
        lrs, losses = map(list, zip(*pairs))
        smooth = signals.ema_smooth(losses, beta)
        lowest = int(np.argmin(smooth))
        slopes = np.gradient(np.asarray(smooth), np.log10(lrs)) if len(smooth) > 2 else np.zeros(len(smooth))
        steepest = int(np.argmin(slopes[:max(lowest, 1)]))
        blow = next((lrs[i] for i in range(lowest, len(smooth)) if smooth[i] > 2 * smooth[lowest]), None)
        self.range_hint = lrs[steepest]
        self.results["range"] = {"lrs": lrs, "losses": losses, "smoothed": smooth, "steepest_lr": lrs[steepest],
                                 "min_lr": lrs[lowest], "blow_up_lr": blow}
        evidence = {"steps_run": len(lrs), "lr_from": lrs[0], "lr_to": lrs[-1], "steepest_fall_lr": lrs[steepest],
                    "lowest_loss_lr": lrs[lowest], "lowest_smoothed_loss": smooth[lowest],
                    "lowest_loss_lr_over_10": lrs[lowest] / 10, "blow_up_lr": blow}
        self.diagnosis.add(Finding(
            "lr_range_test", "info",
            f"LR range test ({len(lrs)} steps, LR {lrs[0]:.1e} -> {lrs[-1]:.1e}): steepest fall at "
            f"{lrs[steepest]:.2e}, lowest smoothed loss at {lrs[lowest]:.2e}"
            + (f", blow-up from {blow:.2e}" if blow else ""), evidence,
            "a hint only: LR finders are biased towards the start LR (Lightning #2814, #21141); the sweep decides"))
        self.display.line(f"LR range test: steepest fall at {lrs[steepest]:.2e}, lowest loss at {lrs[lowest]:.2e}")

    def _sweep_run(self, lr: float, steps: int) -> dict[str, Any]:
        result = self.probe(f"sweep-{lr:.0e}", steps=steps, lr=lr, task=self.task(),
                            overrides={"schedule": {"name": "constant"}, "optimizer.lr": lr})
        stability = result.stability(early_steps=max(10, steps // 10))
        val = result.final_val
        infeasible = result.diverged or not math.isfinite(val) or stability.status == "diverged"
        truncated = not infeasible and len(result.steps) < steps  # stopped by the time limit: not comparable
        status = "infeasible" if infeasible else "truncated" if truncated else stability.status
        point = {"lr": lr, "val_loss": val, "status": status,
                 "steps_run": len(result.steps), "stopped": result.stopped,
                 "curve_steps": result.summary()["curve_steps"], "curve_losses": result.summary()["curve_losses"]}
        self.display.line(f"LR sweep: lr {lr:.2e}: "
                          + ("infeasible" if infeasible else f"val_loss {val:.4f} ({status})")
                          + f" after {len(result.steps)} steps")
        return point

    def sweep(self) -> None:
        runs = len(SWEEP_GRID) + 3
        steps = self.steps_for("sweep", self.plan.sweep_steps, self.step_seconds, runs=runs)
        if steps is None:
            self.diagnosis.skip("LR sweep", "the budget left is too small",
                                f"{runs} runs of {self.plan.sweep_steps[1]} steps", bad_input=False)
            return
        self.sweep_steps = steps
        points: dict[float, dict[str, Any]] = {}
        one_run = steps * self.step_seconds + self.overhead + self.plan.val_batches * self.eval_seconds
        for lr in SWEEP_GRID:
            if points and self.left() < one_run:
                self.diagnosis.skip(f"LR sweep at {lr:g}", "the budget ran out", f"{one_run:.0f} s", bad_input=False)
                continue
            points[lr] = self._sweep_run(lr, steps)

        def best() -> float | None:
            feasible = {lr: p for lr, p in points.items() if p["status"] not in ("infeasible", "truncated")}
            return min(feasible, key=lambda lr: feasible[lr]["val_loss"]) if feasible else None

        for _ in range(2):  # the best at an edge of the grid: extend by a decade that way
            top = best()
            if top is None or self.left() < 2 * steps * self.step_seconds:
                break
            ordered = sorted(points)
            if top == ordered[-1] and top * 10 <= 10.0:
                points[top * 10] = self._sweep_run(top * 10, steps)
            elif top == ordered[0] and top / 10 >= 1e-7:
                points[top / 10] = self._sweep_run(top / 10, steps)
            else:
                break
        top = best()
        if top is not None:
            for lr in (top * 10**0.5, top / 10**0.5):
                if self.left() < 1.5 * steps * self.step_seconds + self.overhead:
                    break
                if not any(math.isclose(lr, known, rel_tol=0.05) for known in points):
                    points[float(f"{lr:.3g}")] = self._sweep_run(float(f"{lr:.3g}"), steps)
        ordered = sorted(points)
        self.results["sweep"] = {"steps": steps, "points": [points[lr] for lr in ordered]}
        infeasible = [lr for lr in ordered if points[lr]["status"] == "infeasible"]
        top = best()
        if top is None:
            self.lr_star = None
            self.diagnosis.add(Finding(
                "lr_sweep", "error", f"every LR of the sweep was infeasible (NaN or blow-up within {steps} steps)",
                {"lrs": ordered, "infeasible": infeasible, "steps": steps},
                "the model diverges at every LR tried: check the sanity findings, clip gradients, or use a smaller "
                "LR than those tried"))
            return
        lr_star, low, high = self._lr_star(points, top)
        above = [lr for lr in infeasible if lr > top]
        if above:  # the interval stops short of the first infeasible LR above the best
            high = min(high, math.sqrt(top * min(above)))
        self.lr_star = lr_star
        self.results["sweep"].update({"lr_star": lr_star, "lr_low": low, "lr_high": high})
        config_lr = float(self.config.optimizer.lr)
        edge = bool(above) and min(above) <= top * 10**0.5 * 1.05
        evidence = {"lr_star": lr_star, "lr_low": low, "lr_high": high, "steps_per_run": steps,
                    "val_loss_at_best": points[top]["val_loss"], "best_grid_lr": top,
                    "val_loss_by_lr": {f"{lr:.3g}": points[lr]["val_loss"] for lr in ordered},
                    "infeasible": infeasible, "config_lr": config_lr}
        far = math.isfinite(config_lr) and (config_lr > 10 * high or config_lr < low / 10)
        self.diagnosis.add(Finding(
            "lr_sweep", "warning" if far else "info",
            f"LR sweep ({len(points)} runs of {steps} steps at constant LR): lr* = {lr_star:.2e} (between {low:.2e} "
            f"and {high:.2e}); your LR {config_lr:.2e}" + (f"; infeasible: {', '.join(f'{x:.0e}' for x in infeasible)}"
                                                         if infeasible else ""),
            evidence, (f"your LR is more than 10x from lr*: try optimizer.lr {_round(lr_star)} (a short-horizon "
                       "sweep; confirm over the full run)") if far else
            "none: your LR is within a decade of lr* (the sweep is short; the best LR for a full run is often "
            "somewhat lower)"))
        if edge:
            self.diagnosis.add(Finding(
                "lr_at_edge_of_stability", "warning",
                f"the best LR {top:.2e} sits next to an infeasible one ({min(above):.2e}): the model may suffer "
                "from optimization instability (Tuning Playbook, Figure 7a)",
                {"best_lr": top, "next_infeasible_lr": min(above), "val_loss_at_best": points[top]["val_loss"],
                 "steps_per_run": steps},
                "stabilise training to reach higher LRs: warmup, clipping, model.norm_position residual"))
        self.display.line(f"LR sweep: lr* = {lr_star:.2e} [{low:.2e}, {high:.2e}]")

    @staticmethod
    def _lr_star(points: dict[float, dict[str, Any]], top: float) -> tuple[float, float, float]:
        """lr* and its interval: the vertex of a parabola through the best point and its feasible neighbours in
        log10 LR, with the LRs whose fitted loss is within 1% of the minimum (bounded by the neighbours)."""
        feasible = sorted(lr for lr, p in points.items() if p["status"] not in ("infeasible", "truncated"))
        i = feasible.index(top)
        left = feasible[i - 1] if i > 0 else top / 10**0.5
        right = feasible[i + 1] if i + 1 < len(feasible) else top * 10**0.5
        if 0 < i < len(feasible) - 1:
            xs = [math.log10(x) for x in (left, top, right)]
            ys = [points[x]["val_loss"] for x in (left, top, right)]
            vertex = signals.parabola_minimum(xs, ys)
            if vertex is not None and xs[0] <= vertex[0] <= xs[2]:
                a = np.polyfit(xs, ys, 2)[0]
                half = math.sqrt(0.01 * abs(vertex[1]) / a)
                low = 10 ** max(xs[0], vertex[0] - half)
                high = 10 ** min(xs[2], vertex[0] + half)
                return 10 ** vertex[0], low, high
        return top, left, right

    def instability(self) -> None:
        lr_star = getattr(self, "lr_star", None) or getattr(self, "range_hint", None)
        self.unstable_lrs: list[float] = []
        sweep = self.results.get("sweep", {})
        for point in sweep.get("points", []):
            if point["status"] in ("infeasible", "jump", "early") and lr_star and point["lr"] > lr_star:
                self.unstable_lrs.append(point["lr"])
        if lr_star is None:
            self.diagnosis.skip("instability probe", "no lr* (the sweep did not run or found no feasible LR)",
                                "a feasible LR from the sweep", bad_input=False)
            return
        per_step = self.step_seconds + self.eval_seconds
        steps = self.steps_for("instability", self.plan.instability_steps, per_step, evals_per_run=0)
        if steps is None:
            self.diagnosis.skip("instability probe", "the budget left is too small",
                                f"{self.plan.instability_steps[1]} steps", bad_input=False)
            return
        lr = 2 * lr_star
        result = self.probe("instability-2x", steps=steps, lr=lr, eval_interval=1,
                            task=self.task(val_batches=1, train_eval_batches=0),
                            overrides={"schedule": {"name": "constant"}, "optimizer.lr": lr},
                            time_limit=max(10.0, 1.25 * steps * per_step))  # later procedures keep their share
        val_steps = [int(e["step"]) for e in result.evals]
        val = [float(e["val_loss"]) for e in result.evals]
        early = max(10, steps // 10)
        on_val = signals.classify(val, val_steps, initial=self.initial_loss, early_steps=early,
                                  stopped=result.stopped if result.diverged else None)
        on_train = result.stability(early_steps=early, initial=self.initial_loss)
        verdict = on_val if not on_val.stable else on_train
        self.results["instability"] = {"lr": lr, "steps": val_steps, "val_losses": val,
                                       "train": result.summary(), "status": verdict.status}
        evidence = {"lr": lr, "lr_star": lr_star, "steps_run": len(result.steps), "evaluated_every_step": True,
                    **verdict.evidence}
        if verdict.stable:
            self.diagnosis.add(Finding(
                "instability_probe", "info", f"at 2x lr* = {lr:.2e}, evaluated every step for {len(val)} steps: "
                f"no early instability ({verdict.message})", evidence, "none"))
        else:
            self.unstable_lrs.append(lr)
            kind = "early" if verdict.early else verdict.status
            self.diagnosis.add(Finding(
                "early_instability" if verdict.early else "instability_at_2x", "warning",
                f"at 2x lr* = {lr:.2e}, evaluated every step: {kind} instability: {verdict.message}", evidence,
                "the stable range ends within 2x of lr*: early instability is what warmup fixes (see the warmup "
                "search); keep a margin below this LR"))
        self.display.line(f"instability probe: 2x lr* = {lr:.2e} for {len(val)} evaluated steps: {verdict.status}")
        jump_steps = self.steps_for("jumps", self.plan.jump_steps, self.step_seconds, runs=2)
        if jump_steps is None:
            self.diagnosis.skip("5x/10x lr* runs", "the budget left is too small",
                                f"2 runs of {self.plan.jump_steps[1]} steps", bad_input=False)
            return
        self.results["jumps"] = []
        for factor in (5, 10):
            lr = factor * lr_star
            result = self.probe(f"jump-{factor}x", steps=jump_steps, lr=lr, task=self.task(val_batches=1),
                                overrides={"schedule": {"name": "constant"}, "optimizer.lr": lr})
            stability = result.stability(early_steps=max(10, jump_steps // 10), initial=self.initial_loss)
            self.results["jumps"].append({"factor": factor, "lr": lr, "status": stability.status,
                                          **result.summary()})
            if not stability.stable:
                self.unstable_lrs.append(lr)
            self.diagnosis.add(Finding(
                f"lr_{factor}x_probe", "info",
                f"at {factor}x lr* = {lr:.2e} for {len(result.steps)} steps: {stability.status}: {stability.message}",
                {"lr": lr, "factor": factor, "steps_run": len(result.steps), **stability.evidence},
                "expected: instability above the stable range marks where it ends" if not stability.stable else
                "none: the model tolerates LRs well above lr*"))
            self.display.line(f"instability probe: {factor}x lr* = {lr:.2e}: {stability.status}")

    def warmup_search(self) -> None:
        """The Playbook's warmup search: for each base LR the shortest warmup ``w`` (then ``2 w`` steps at the LR)
        that trains stably. Base LRs: your config's when it is unstable, then 10x and 100x the lowest unstable LR
        found (the FAQ's "about 10x" and "repeat for about 100x"); 100x starts from the warmup 10x needed and is
        skipped when 10x found none."""
        self.warmups: list[dict[str, Any]] = []
        cap = int(0.1 * self.config.max_steps)
        candidates = [w for w in WARMUPS if w <= cap]
        if candidates and cap >= 2 * candidates[-1] and cap not in candidates:
            candidates.append(cap)
        if not candidates:
            self.diagnosis.skip("warmup search", f"max_steps {self.config.max_steps} caps the warmup at {cap} steps "
                                "(10% of the run), below the shortest warmup tried (10)",
                                "max_steps >= 100")
            return
        targets: list[tuple[str, float, int | None]] = []
        stability = getattr(self, "config_stability", None)
        config_lr = float(self.config.optimizer.lr)
        if stability is not None and not stability.stable and math.isfinite(config_lr):
            targets.append(("your config's LR", config_lr, None))
            self.unstable_lrs.append(config_lr)
        unstable = min(self.unstable_lrs) if getattr(self, "unstable_lrs", None) else None
        if unstable is not None:
            targets += [(f"{factor}x the lowest unstable LR (Playbook)", float(f"{factor * unstable:.3g}"), factor)
                        for factor in WARMUP_FACTORS]
        if not targets:
            self.diagnosis.skip("warmup search", "no unstable LR was found (your config and the LRs up to 10x lr* "
                                "trained stably)", "an unstable LR", bad_input=False)
            return
        self.results["warmup"] = []
        for label, base, factor in targets:
            tried_here = candidates
            if factor is not None and factor > WARMUP_FACTORS[0]:
                lower = next((e for e in self.warmups if e["factor"] == WARMUP_FACTORS[0]), None)
                if lower is None or lower["found"] is None:
                    self.diagnosis.skip(f"warmup search at {base:.2e} ({label})",
                                        f"no warmup let {WARMUP_FACTORS[0]}x the lowest unstable LR train stably",
                                        f"a warmup found at {WARMUP_FACTORS[0]}x", bad_input=False)
                    continue
                tried_here = [w for w in candidates if w >= lower["found"]]  # a higher LR needs no shorter warmup
            found = None
            tried = []
            for w in tried_here:
                cost = 3 * w * self.step_seconds + self.overhead
                if self.left() < cost:
                    tried.append({"warmup": w, "status": "skipped (budget)"})
                    continue
                result = self.probe(f"warmup-{w}-lr{base:.0e}", steps=3 * w, lr=base, task=self.task(val_batches=1),
                                    overrides={"schedule": {"name": "constant", "warmup": w}, "optimizer.lr": base})
                verdict = result.stability(early_steps=w, initial=self.initial_loss)
                tried.append({"warmup": w, "status": verdict.status, "steps_run": len(result.steps),
                              "final_loss": verdict.evidence.get("final_loss"), "message": verdict.message,
                              "curve_steps": result.summary()["curve_steps"],
                              "curve_losses": result.summary()["curve_losses"]})
                self.display.line(f"warmup search: base LR {base:.2e} ({label}), warmup {w}: {verdict.status}")
                if verdict.stable:
                    found = w
                    break
            self.results["warmup"].append({"target": label, "base_lr": base, "factor": factor, "tried": tried,
                                           "found": found})
            self.warmups.append({"label": label, "base_lr": base, "factor": factor, "found": found})
            if all(t["status"] == "skipped (budget)" for t in tried):
                self.diagnosis.skip(f"warmup search at {base:.2e}", "the budget left is too small",
                                    f"{3 * tried_here[0]} steps", bad_input=False)
                continue
            evidence = {"base_lr": base, "candidates": tried_here, "cap_10pct": cap,
                        "results": {str(t["warmup"]): t["status"] for t in tried}, "post_warmup_steps": "2 x warmup"}
            if found is None:
                self.diagnosis.add(Finding(
                    "warmup_not_found", "warning",
                    f"no warmup of {', '.join(map(str, tried_here))} steps lets LR {base:.2e} ({label}) train "
                    "stably", evidence, "this LR is out of reach with warmup alone: lower it (lr* from the sweep), or "
                    "add clipping at the 90th percentile of gradient norms"))
                continue
            self.diagnosis.add(Finding(
                "warmup", "info",
                f"warmup {found} steps lets LR {base:.2e} ({label}) train stably (shortest of "
                f"{', '.join(map(str, tried_here))})", {**evidence, "warmup_steps": found,
                                                        "fraction_of_run": found / self.config.max_steps},
                f"schedule.warmup {found}, prepended (max_steps grows by as much)"
                + ("" if factor is None else "; the warmup comparison decides whether the higher LR pays")))

    def _prepended(self, base: float, warmup: int) -> dict[str, Any]:
        """Config changes that train at LR ``base`` with ``warmup`` steps prepended to the schedule (the Playbook's
        10,000 steps + 1,000 of warmup = 11,000)."""
        current = self.config.schedule.get("warmup", 0)
        current = current if isinstance(current, int) else 0
        config_lr = float(self.config.optimizer.lr)
        changes: dict[str, Any] = {} if base == config_lr else {"optimizer.lr": base}
        if warmup > current:
            changes["schedule.warmup"] = warmup
            changes["max_steps"] = self.config.max_steps + (warmup - current)
        return changes

    def compare_warmups(self) -> None:
        """The Playbook's last step of the warmup search: each warmup found, prepended to your config at its base
        LR, trained as long as the config run (plus the warmup) and compared with the config as it is, the
        baseline, by their best checkpoints (the lowest validation loss of each, not the last)."""
        found = [e for e in getattr(self, "warmups", []) if e["found"] is not None]
        config_lr = float(self.config.optimizer.lr)
        if not any(e["base_lr"] > config_lr for e in found):
            return  # nothing above your LR to compare (a warmup at your LR is checked by the recommended config)
        baseline = getattr(self, "config_result", None)
        if baseline is None:
            self.diagnosis.skip("warmup comparison", "the config run did not run", "the config run", bad_input=False)
            return
        steps = self.config_steps
        every = max(1, steps // 4)
        rows = []
        for entry in found:
            changes = self._prepended(entry["base_lr"], entry["found"])
            length = steps + changes.get("max_steps", self.config.max_steps) - self.config.max_steps
            cost = 1.2 * length * self.step_seconds + self.overhead + 4 * self.plan.val_batches * self.eval_seconds
            if self.left() < cost:
                self.diagnosis.skip(f"warmup comparison at {entry['base_lr']:.2e}", "the budget left is too small",
                                    f"{length} steps", bad_input=False)
                continue
            result = self.probe(f"compare-w{entry['found']}-lr{entry['base_lr']:.0e}",
                                steps=changes.get("max_steps", self.config.max_steps), step_limit=length,
                                lr=entry["base_lr"], task=self.task(), overrides=changes, keep_length=True,
                                eval_interval=every)
            best = best_checkpoint(result)
            rows.append({**entry, "changes": changes, "steps_run": len(result.steps), "stopped": result.stopped,
                         "best_step": best[0] if best else None, "best_val_loss": best[1] if best else math.inf,
                         "val_steps": result.summary()["val_steps"], "val_losses": result.summary()["val_losses"]})
            shown = f"best val_loss {best[1]:.4f} at step {best[0]}" if best else "no finite evaluation"
            self.display.line(f"warmup comparison: LR {entry['base_lr']:.2e} with warmup {entry['found']}: {shown}")
        base_best = best_checkpoint(baseline)
        reference = {"label": "your config as it is", "best_step": base_best[0] if base_best else None,
                     "best_val_loss": base_best[1] if base_best else math.inf, "steps_run": len(baseline.steps)}
        self.results["compare"] = {"baseline": reference, "candidates": rows}
        higher = [r for r in rows if r["base_lr"] > config_lr]
        if not higher:
            return
        # the reference: the better of your config as it is and your config with the warmup its own LR needs
        for row in rows:
            if row["base_lr"] <= config_lr and row["best_val_loss"] < reference["best_val_loss"]:
                reference = row
        top = min(higher, key=lambda r: r["best_val_loss"])
        shown = (f"val_loss {reference['best_val_loss']:.4f} at step {reference['best_step']} "
                 f"({reference['label']})" if math.isfinite(reference["best_val_loss"]) else
                 f"no finite evaluation ({reference['label']})")
        evidence = {"reference": reference["label"], "reference_best_val_loss": reference["best_val_loss"],
                    "reference_best_step": reference["best_step"], "steps": steps, "eval_every": every,
                    "best_val_loss_by_candidate": {f"lr {r['base_lr']:.3g}, warmup {r['found']}": r["best_val_loss"]
                                                   for r in rows}}
        if top["best_val_loss"] < reference["best_val_loss"]:
            self.warmup_winner = top
            self.diagnosis.add(Finding(
                "warmup_unlocks_lr", "info",
                f"warmup {top['found']} steps unlocks LR {top['base_lr']:.2e} ({top['label']}): its best checkpoint, "
                f"val_loss {top['best_val_loss']:.4f} at step {top['best_step']}, beats the best checkpoint of the "
                f"baseline, {shown}",
                {**evidence, "lr": top["base_lr"], "warmup_steps": top["found"], "best_val_loss": top["best_val_loss"],
                 "best_step": top["best_step"]},
                "train at the higher LR with the warmup prepended (recommended.yaml)", top["changes"]))
        else:
            self.diagnosis.add(Finding(
                "warmup_no_gain", "info",
                f"no warmup at an LR above yours beat the best checkpoint of the baseline, {shown}: "
                + "; ".join(f"LR {r['base_lr']:.2e} with warmup {r['found']}: best val_loss {r['best_val_loss']:.4f}"
                            for r in higher),
                evidence, "none: keep your LR (a warmup that makes a higher LR trainable pays only when that LR "
                "trains better)"))

    def recommend(self) -> None:
        """Changes for ``recommended.yaml``: only what the probes showed is needed, then a check run of it. A
        warmup that unlocks a higher LR (the warmup comparison) goes in whether or not your config was stable; an
        unstable config otherwise gets the warmup its own LR needs (or lr*), and a clip: the 90th percentile of its
        gradient norms, or a tighter one when it clipped already (``clip_harder``)."""
        changes: dict[str, Any] = {}
        stability = getattr(self, "config_stability", None)
        unstable = stability is not None and not stability.stable
        winner = getattr(self, "warmup_winner", None)
        found = next((e["found"] for e in getattr(self, "warmups", []) if e["factor"] is None), None)
        config_lr = float(self.config.optimizer.lr)
        if winner is not None:
            changes.update(winner["changes"])
        elif unstable and found is not None:
            changes.update({k: v for k, v in self._prepended(config_lr, found).items() if k != "optimizer.lr"})
        elif unstable and getattr(self, "lr_star", None):
            changes["optimizer.lr"] = _round(self.lr_star)
        if unstable:
            if self.config.clip.mode in ("norm", "percentile"):
                harder = getattr(self, "clip_finding", None)
                changes.update({k: v for k, v in (harder.changes if harder else {}).items() if k.startswith("clip.")})
            else:
                p90 = self.diagnosis.data.get("grad_norm", {}).get("p90")
                if p90 and math.isfinite(p90):
                    changes["clip.mode"], changes["clip.max_norm"] = "norm", _round(p90)
        warmup = changes.get("schedule.warmup")
        if warmup is not None and warmup > 0.05 * self.config.max_steps:
            self.diagnosis.add(Finding(
                "lengthen_run", "warning",
                f"the warmup needed ({warmup} steps) is {warmup / self.config.max_steps:.0%} of the run, over 5%",
                {"warmup_steps": warmup, "max_steps": self.config.max_steps,
                 "fraction": warmup / self.config.max_steps},
                f"lengthen the run by the warmup (Playbook): max_steps {changes['max_steps']}",
                {"max_steps": changes["max_steps"]}))
        self.changes = changes
        if self.schedule_replaced is not None:
            used = self.config.schedule
            self.diagnosis.add(Finding(
                "schedule_last", "info",
                f"every procedure ran at a constant LR after the warmup (--schedule constant), not your schedule "
                f"{self.schedule_replaced.get('name')!r}; recommended.yaml keeps the constant LR",
                {"your_schedule": self.schedule_replaced, "used": dict(used)},
                "tune the schedule last (the training-dynamics notes): once the LR, warmup and clipping are settled, "
                "compare decays over the whole run, e.g. keel sweep recommended.yaml "
                "'sweep.schedule.name=[constant, cosine, linear]'"))
        if changes:
            self.diagnosis.add(Finding(
                "recommended_changes", "info",
                "recommended.yaml changes " + ", ".join(f"{k} -> {v}" for k, v in changes.items()),
                {"changes": changes, "config_run_steps": getattr(self, "config_steps", 0),
                 "from": "config run, sweep, warmup search and comparison"},
                "train with recommended.yaml", changes))
        self.verify(changes)

    def verify(self, changes: dict[str, Any]) -> None:
        result0 = getattr(self, "config_result", None)
        if not changes or not self.plan.verify or result0 is None:
            return
        steps = self.config_steps
        if self.left() < steps * self.step_seconds * 1.2 + self.overhead:
            self.diagnosis.skip("verify recommended config", "the budget left is too small", f"{steps} steps",
                                bad_input=False)
            return
        max_steps = changes.get("max_steps", self.config.max_steps)
        result = self.probe("recommended", steps=max_steps, step_limit=steps, lr=None, task=self.task(),
                            overrides=changes, keep_length=True, eval_interval=max(1, steps // 4))
        stability = result.stability(early_steps=max(10, signals.warmup_end(result.lrs), steps // 10))
        self.results["recommended"] = {**result.summary(), "status": stability.status}
        self.diagnosis.add(Finding(
            "recommended_verified" if stability.stable else "recommended_unverified",
            "info" if stability.stable else "warning",
            f"the recommended config ran {len(result.steps)} steps: "
            + ("stable" if stability.stable else "still unstable") + f": {stability.message}",
            {"steps_run": len(result.steps), **stability.evidence},
            "train with recommended.yaml" if stability.stable else
            "warmup alone does not fix it: lower the LR or add clipping (see the other findings)"))
        self.display.line(f"recommended config: {len(result.steps)} steps: {stability.status}")

    def write(self, plots: bool = True) -> None:
        """``diagnosis.json``, ``recommended.yaml`` and (``plots``) ``lr_sweep.png`` into the output directory, once
        setup has finished (a partial diagnosis is written too)."""
        self.diagnosis.data.update(self.results)
        if not self.ready:
            return
        self.diagnosis.write(self.out)
        write_recommended(self.out, self.user_raw, self.changes, self.diagnosis.target, self.notes)
        if plots and self.results.get("sweep", {}).get("points"):
            from keel.diagnose.plots import sweep_figure
            from keel.diagnose.run import _write_bytes

            lr = self.config.optimizer.lr
            _write_bytes(self.out / "lr_sweep.png",
                         sweep_figure(self.results["sweep"], lr if isinstance(lr, float) else None))

    @staticmethod
    def _accepts(optimizer: Any, key: str) -> bool:
        """Whether the (typed) optimizer block has the hyperparameter ``key``."""
        return key in optimizer.settings


def best_checkpoint(result: ProbeResult) -> tuple[int, float] | None:
    """(step, val_loss) of a probe's best evaluation, the checkpoint the Playbook compares runs by (not the
    last); None when no evaluation is finite."""
    points = [(int(e["step"]), float(e["val_loss"])) for e in result.evals
              if isinstance(e.get("val_loss"), (int, float)) and math.isfinite(e["val_loss"])]
    return min(points, key=lambda point: point[1]) if points else None


def diagnose_config(raw: dict[str, Any], out_dir: str | Path, budget: float, *, target: str = "config",
                    plan: Plan | None = None, display: Display | None = None, threads: int | None = 1,
                    schedule: str = "config") -> Session:
    """Run every procedure on ``raw`` (a config as a dict) within ``budget`` seconds; write ``diagnosis.json`` and
    ``recommended.yaml`` into ``out_dir``. Returns the session (its ``diagnosis`` and ``results``).

    ``threads``: CPU threads of the probes when the config sets none (default 1: on a shared CPU torch's default
    OpenMP threads can make each step several times slower; None keeps torch's default). ``schedule``:
    ``config`` trains the config run (and the recommended config) with your schedule; ``constant`` replaces it by a
    constant LR after its warmup everywhere, recommended.yaml included (the notes: tune the schedule last)."""
    session = Session(raw, Path(out_dir), budget, target=target, plan=plan, display=display, threads=threads,
                      schedule=schedule)
    try:
        session.run()
    finally:
        session.write()
    return session
