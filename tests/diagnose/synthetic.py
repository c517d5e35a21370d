"""A deterministic stand-in for the probes of `keel diagnose --config`: each probe's records are a closed-form
function of its config (LR schedule, clip), so a test decides which LRs and warmups train stably and runs the real
procedures (sweep, instability probe, warmup search and comparison, recommended config) in well under a second.

The model, per step t with learning rate lr_t (keel's own schedule of the probe's config) and gradient norm
g_t = norm_floor + 3 exp(-t / 5) (large at first, as real gradients are):

- the update is u_t = lr_t min(g_t, clip.max_norm) (no clip: g_t);
- it diverges (a NaN loss, the trainer's non-finite stop) once u_t > edge (1 + t / tau): the stable LR grows as
  training leaves its initial region, which is what warmup exploits (a warmup w lets LR base train when
  base <= edge (1 + w / tau), give or take the norms);
- otherwise the loss is floor + lr_cost lr_t + (initial - floor) exp(-P_t), P_t the sum of the updates so far: a
  higher LR falls faster and settles higher; evaluations read val_loss = loss + 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from keel import schedules
from keel.diagnose.active import Session
from keel.diagnose.probes import Display, LRRangeCallback, ProbeResult


@dataclass
class Synthetic:
    edge: float = 0.25
    tau: float = 2.0
    initial: float = 5.0
    floor: float = 1.0
    lr_cost: float = 0.1
    norm_floor: float = 1.0

    def norm(self, t: int) -> float:
        return self.norm_floor + 3.0 * math.exp(-t / 5.0)

    def attach(self, session: Session) -> Session:
        """``session`` with its setup, sanity checks and probes replaced by this model."""
        session.probe = lambda name, **options: self.probe(session, name, **options)
        session.setup = lambda: self.setup(session)
        session.sanity = lambda: None
        session.task = lambda **options: None
        return session

    def setup(self, session: Session) -> None:
        session.step_seconds, session.eval_seconds, session.small_step_seconds = 1e-3, 1e-4, 1e-3
        session.overhead, session.initial_loss, session.ready = 0.01, self.initial, True

    def probe(self, session: Session, name: str, *, steps: int, overrides: dict[str, Any], lr: float | None,
              task: Any = None, step_limit: int | None = None, callbacks: tuple = (), eval_interval: int | None = None,
              time_limit: float | None = None, done=None, keep_length: bool = False) -> ProbeResult:
        config = session.probe_config(steps, overrides, eval_interval, keep_length)
        schedule = schedules.from_config(config.schedule, base_lr=float(config.optimizer["lr"]),
                                         total_steps=config.max_steps)
        ranged = next((c for c in callbacks if isinstance(c, LRRangeCallback)), None)
        clip = config.clip.max_norm if config.clip.mode == "norm" else math.inf
        total = min(step_limit or steps, config.max_steps)
        eval_steps = config.eval_interval.amount  # set in steps above
        result = ProbeResult(name, lr, total)
        progress = 0.0
        for t in range(total):
            rate = ranged.lr(t) if ranged is not None else schedule(t)
            g = self.norm(t)
            update = rate * min(g, clip)
            result.steps.append(t)
            result.lrs.append(rate)
            result.norms.append(g)
            result.clipped.append(g > clip)
            result.step_times.append(1e-3 * t)
            if update > self.edge * (1 + t / self.tau):
                result.losses.append(math.nan)
                result.unstable_error, result.stopped = True, f"3 consecutive non-finite losses from step {t}"
                break
            loss = self.floor + self.lr_cost * rate + (self.initial - self.floor) * math.exp(-progress)
            progress += update
            result.losses.append(loss)
            if (t + 1) % eval_steps == 0 or t + 1 == total:
                result.evals.append({"kind": "eval", "step": t + 1, "val_loss": loss + 0.05})
            if done is not None and done(loss):
                result.reached, result.stopped = True, f"reached its goal at step {t + 1}"
                break
        result.records = [{"kind": "step", "step": s, "loss": v, "lr": r, "grad_norm": g, "clipped": c}
                          for s, v, r, g, c in zip(result.steps, result.losses, result.lrs, result.norms,
                                                   result.clipped)] + result.evals
        return result


def run_session(raw: dict[str, Any], out, model: Synthetic | None = None, **options) -> Session:
    """A ``keel diagnose --config`` session on ``raw`` with every probe drawn from ``model``; its outputs written
    into ``out`` as ``diagnose_config`` writes them (the LR plot left out: it costs more than the procedures)."""
    session = (model or Synthetic()).attach(Session(raw, out, budget=600, display=Display(enabled=False),
                                                    **options))
    try:
        session.run()
    finally:
        session.write(plots=False)
    return session
