"""``keel ensemble MEMBERS...``: score the average of the members' predicted distributions against each member
(cross-entropy; for classifiers also the accuracy of its argmax)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keel.errors import KeelError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ensemble",
        help="evaluate an ensemble (snapshots of one run, or independent runs) against its members",
        description="Evaluate the ensemble whose prediction is the mean of its members' probability distributions, "
        "on the validation split, beside each member. MEMBERS are .safetensors files, checkpoint directories, run "
        "directories (their newest checkpoint) or a run's snapshots/ folder (every snapshot in it).",
    )
    parser.add_argument("members", nargs="+", metavar="MEMBER", help="weights files, checkpoints, runs, snapshots/")
    parser.add_argument("--weights", default="model", metavar="NAME",
                        help="for checkpoints and runs: model (each checkpoint's model.safetensors, what it holds: the "
                        "EMA under ema.checkpoint_weights: ema; default), raw (the trained weights), or a saved "
                        "average: ema, polyak, swa")
    parser.add_argument("--config", metavar="FILE", help="run config (default: each member's run config.yaml)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def resolve_members(members: list[str], weights: str) -> list[Path]:
    """The weights file of each member; a snapshots folder expands to its snapshots, a run to its newest intact
    checkpoint (newer corrupt ones are reported on stderr and passed over)."""
    from keel import rundir

    def report(message: str) -> None:
        print(message, file=sys.stderr)

    files: list[Path] = []
    for raw in members:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif (path / rundir.MODEL_WEIGHTS).is_file():
            files.append(rundir.checkpoint_weights(path, weights))
        elif rundir.list_checkpoints(rundir.RunDir(path).checkpoints):
            newest = rundir.newest_intact(rundir.RunDir(path).checkpoints, report=report)
            if newest is None:
                raise KeelError(f"ensemble: {raw!r} holds no intact checkpoint")
            file = rundir.checkpoint_weights(newest, weights)
            if not file.is_file():
                raise KeelError(f"ensemble: {str(file)!r} does not exist (weights={weights!r})")
            files.append(file)
        elif rundir.list_snapshots(path):
            files.extend(rundir.list_snapshots(path))
        else:
            raise KeelError(f"ensemble: {raw!r} is not a weights file, checkpoint, run directory or snapshots folder")
    return files


def run(args: argparse.Namespace) -> int:
    from keel.averaging.ensemble import ensemble_accuracy, ensemble_log_probs
    from keel.task_registry import task_spec
    from keel.train.scoring import ValidationScorer, find_run_config

    files = resolve_members(args.members, args.weights)
    scorers: dict[Path, ValidationScorer] = {}
    reference = None
    losses, log_probs, probs, accuracies, targets = [], [], [], [], None
    for file in files:
        config_path = Path(args.config) if args.config else find_run_config(file)
        if config_path is None:
            raise KeelError(f"--config: none given and no config.yaml found beside {str(file)!r}")
        if config_path not in scorers:
            scorer = ValidationScorer.from_config_file(config_path, device=args.device)
            spec = task_spec(scorer.config.task)
            context = spec.context_length(scorer.config) if spec is not None and spec.context_length else None
            shared = (scorer.config.task, scorer.config.task_args, scorer.config.data.model_dump(), context)
            if reference is not None and shared != reference:
                raise KeelError(f"ensemble: {str(config_path)!r} has another task, data or context length than "
                                "the first member's run; members must be scored on the same validation data")
            reference = shared
            scorers[config_path] = scorer
        found = scorers[config_path].predictions(file)
        log_probs.append(found.log_probs)
        losses.append(float(-found.log_probs.mean()))
        if found.probs is not None:  # a classifier: its distributions, for the ensemble's argmax
            probs.append(found.probs)
            accuracies.append(found.accuracy())
            targets = found.targets
    ensemble = float(-ensemble_log_probs(log_probs).mean())
    best = min(losses)
    classifier = len(probs) == len(files)
    members = [{"weights": str(f), "val_loss": v} for f, v in zip(files, losses)]
    if classifier:
        for member, accuracy in zip(members, accuracies):
            member["val_accuracy"] = accuracy
    result = {"members": members, "ensemble_val_loss": ensemble, "best_member_val_loss": best,
              "mean_member_val_loss": sum(losses) / len(losses), "gain": best - ensemble,
              "tokens": int(log_probs[0].numel())}
    if classifier:
        accuracy = ensemble_accuracy(probs, targets)
        result.update(ensemble_val_accuracy=accuracy, best_member_val_accuracy=max(accuracies),
                      mean_member_val_accuracy=sum(accuracies) / len(accuracies),
                      accuracy_gain=accuracy - max(accuracies))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    width, unit = max(len(str(f)) for f in files), "example" if classifier else "token"
    print(f"  {'member':<{width}}  val_loss{'  val_accuracy' if classifier else ''}")
    for member in members:
        shown = f"  {member['val_accuracy']:.4f}" if classifier else ""
        print(f"  {member['weights']:<{width}}  {member['val_loss']:.4f}{shown}")
    print(f"ensemble of {len(files)}: val_loss {ensemble:.4f}; best member {best:.4f}; "
          f"mean member {result['mean_member_val_loss']:.4f}; gain over the best member {result['gain']:+.4f} "
          f"nats/{unit} ({result['tokens']:,} {unit}s)")
    if classifier:
        print(f"ensemble val_accuracy {result['ensemble_val_accuracy']:.4f} (argmax of the mean distribution); best "
              f"member {result['best_member_val_accuracy']:.4f}; mean member {result['mean_member_val_accuracy']:.4f}; "
              f"gain over the best member {result['accuracy_gain']:+.4f}")
    return 0
