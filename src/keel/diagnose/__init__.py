"""``keel diagnose`` and ``keel report``: the Deep Learning Tuning Playbook and the training-dynamics notes, automated.

- ``keel.diagnose.findings``: a finding (kind, severity, evidence, recommendation) and ``diagnosis.json``.
- ``keel.diagnose.run``: diagnosis of a finished or running run from its metrics (learning curves, gradient
  norms, update-to-weight ratios, instability events).
- ``keel.diagnose.active``: the active procedures on a config, each a short training through the normal trainer
  (sanity checks, LR range test and sweep, instability probe, warmup search) and ``recommended.yaml``.
- ``keel.diagnose.update_ratio``: the ``diagnostics`` technique that logs ``||ΔW||/||W||`` while training.
- ``keel.diagnose.report``: the static HTML report of one or more runs.

Nothing heavy is imported here: the trainer loads ``keel.diagnose.update_ratio`` as a built-in technique.
"""
