"""``python -m keel.sweep.worker STAGE_DIR [--index I] [--parent PID]``: one worker of a sweep stage (``keel sweep
--workers K`` starts K of them). It runs trials until the study has the stage's number of finished trials, and stops
when the process ``--parent`` is gone (a ``keel sweep`` killed, even with SIGKILL; ``keel.parent_process``): a trial
still training is abandoned, and retried by ``keel sweep --resume`` as after any crash; a trial that finished
training is recorded first. Its lines go to the parent's pipe; once nobody reads them they are dropped."""

from __future__ import annotations

import argparse
import sys

from keel.errors import KeelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keel.sweep.worker", description=__doc__)
    parser.add_argument("stage_dir", help="a stage directory (holds stage.yaml)")
    parser.add_argument("--index", type=int, default=0, help="this worker's index (offsets the sampler's seed)")
    parser.add_argument("--parent", type=int, help="stop when this process (the keel sweep) is gone")
    args = parser.parse_args(argv)
    if args.parent is not None:
        from keel import parent_process

        parent_process.stop_with_parent(args.parent)
    from keel.sweep.study import Stage, printing_safely, run_worker

    try:
        run_worker(Stage.load(args.stage_dir), args.index, say=printing_safely(lambda line: print(line, flush=True)))
    except KeelError as error:
        printing_safely(lambda line: print(line, file=sys.stderr, flush=True))(
            f"keel sweep worker: error: {error}".replace("\n", " "))
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit as stop:
        from keel import parent_process

        if isinstance(stop, parent_process.ParentGone):
            parent_process.end_now()  # the trial's LOCK released, a finished trial recorded: nothing is left to do
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
