"""``python -m keel.sweep.worker STAGE_DIR [--index I] [--parent PID]``: one worker of a sweep stage (``keel sweep
--workers K`` starts K of them). It runs trials until the study has the stage's number of finished trials, and stops
when the process ``--parent`` is gone (a ``keel sweep`` killed, even with SIGKILL): its running trial is then retried
by ``keel sweep --resume``, as after any crash."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from keel.errors import KeelError

PARENT_POLL_SECONDS = 1.0


def _stop_with(parent: int) -> None:
    """Terminate this process once its parent is no longer ``parent`` (the orphan is re-parented)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="keel-sweep-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keel.sweep.worker", description=__doc__)
    parser.add_argument("stage_dir", help="a stage directory (holds stage.yaml)")
    parser.add_argument("--index", type=int, default=0, help="this worker's index (offsets the sampler's seed)")
    parser.add_argument("--parent", type=int, help="stop when this process (the keel sweep) is gone")
    args = parser.parse_args(argv)
    if args.parent is not None:
        _stop_with(args.parent)
    from keel.sweep.study import Stage, run_worker

    try:
        run_worker(Stage.load(args.stage_dir), args.index, say=lambda line: print(line, flush=True))
    except KeelError as error:
        print(f"keel sweep worker: error: {error}".replace("\n", " "), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
