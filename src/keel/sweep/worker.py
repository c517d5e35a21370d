"""``python -m keel.sweep.worker STAGE_DIR [--index I]``: one worker of a sweep stage (``keel sweep --workers K``
starts K of them). It runs trials until the study has the stage's number of finished trials."""

from __future__ import annotations

import argparse
import sys

from keel.errors import KeelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keel.sweep.worker", description=__doc__)
    parser.add_argument("stage_dir", help="a stage directory (holds stage.yaml)")
    parser.add_argument("--index", type=int, default=0, help="this worker's index (offsets the sampler's seed)")
    args = parser.parse_args(argv)
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
