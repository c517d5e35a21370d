"""keel inside other trainers: thin adapters over keel's units for PyTorch Lightning and the Hugging Face Trainer.

- ``keel.integrations.lightning`` (``pip install 'keel[lightning]'``): Lightning callbacks (EMA, SWA, Polyak,
  CheckpointAverage, Clip, NonFinite, SpikeRollback, SeqLenWarmup, UpdateRatio, GradNorm), ``keel_scheduler`` and
  ``keel_optimizers`` for ``configure_optimizers``.
- ``keel.integrations.hf`` (``pip install 'keel[hf]'``): ``TrainerCallback``s for the same techniques where the
  Trainer's events allow, and ``keel_optimizers(model, config)`` for ``Trainer(optimizers=...)``.
- ``keel.integrations.scheduler``: what both share, a keel schedule as a torch LR scheduler (``KeelLRScheduler``,
  which also carries out ``optimizer.unfreeze_at``).
- ``keel.integrations.callbacks``: the logic both trainers' callbacks share (argument checks, the SWA phase's LR, the
  clipper a run starts with).

Each adapter wraps the unit keel's own trainer wraps (``keel.averaging``, ``keel.grad``, ``keel.schedules``,
``keel.data.seq_warmup``, ``keel.diagnose.update_ratio``), so the numbers are the same; see docs/integrations.md.
``keel diagnose`` and ``keel report`` read the runs of both trainers (``keel.diagnose.readers``).
"""
