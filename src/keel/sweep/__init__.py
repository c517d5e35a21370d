"""``keel sweep``: hyperparameter search and random restarts on Optuna, from one laptop to many machines.

``keel.sweep.space`` (the ``sweep:`` and ``sweep_options:`` config blocks) needs nothing beyond keel; the search
itself (``keel.sweep.study``, ``keel.sweep.presets``, ``keel.sweep.results``) needs Optuna: ``pip install
'keel[sweep]'``. See docs/sweep.md.
"""

from keel.sweep.space import Distribution, SweepOptions, apply_params, check_space, parse_distribution, space_of

__all__ = ["Distribution", "SweepOptions", "apply_params", "check_space", "parse_distribution", "space_of"]
