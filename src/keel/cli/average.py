"""``keel average PATHS... --out FILE``: average checkpoints into one weights file, streamed (~1 fp32 model)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "average",
        help="average checkpoints (the last N of a run, the best k, or a list of files) into one weights file",
        description="Average the weights of several checkpoints into one safetensors file. PATHS are .safetensors "
        "files, keel checkpoint directories (step_XXXXXXXX), checkpoints/ folders or run directories (all their "
        "checkpoints, oldest first). Floating-point tensors are averaged in fp32; integer ones are copied from the "
        "newest input. Memory stays near one fp32 model whatever the number of inputs.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="checkpoints, run directories or .safetensors files")
    parser.add_argument("--out", required=True, metavar="FILE", help="the averaged weights (.safetensors) to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, metavar="N", help="average the newest N checkpoints")
    which.add_argument("--best", type=int, metavar="K", help="average the K checkpoints with the best --metric")
    parser.add_argument("--metric", default="val_loss", help="metrics.jsonl key ranking checkpoints for --best "
                        "(default: val_loss)")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="lower or higher is better (min)")
    parser.add_argument("--weights", default="model", metavar="NAME",
                        help="model (each checkpoint's model.safetensors, what the checkpoint holds: the EMA under "
                        "ema.checkpoint_weights: ema, as OpenNMT-tf averages; default), raw (the trained weights), or "
                        "an average saved in the checkpoints: ema, polyak, swa")
    parser.add_argument("--prefix", metavar="P", help="average only tensors whose name starts with P; the others "
                        "are copied from the newest input")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        help="dtype of the averaged tensors (default: as in the newest input)")
    parser.add_argument("--eval", action="store_true", help="score the average and each input on the validation "
                        "split (needs the run's config.yaml, or --config)")
    parser.add_argument("--config", metavar="FILE", help="run config for --eval (default: the inputs' run)")
    parser.add_argument("--device", default="cpu", help="device for --eval (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default: 1; averaging is bound by memory and disk, not compute)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from keel.averaging.checkpoints import average_checkpoints_to_file, resolve_checkpoints

    torch.set_num_threads(max(1, args.threads))
    files = resolve_checkpoints(args.paths, last=args.last, best=args.best, metric=args.metric, mode=args.mode,
                                weights=args.weights)
    scorer = None
    if args.eval:  # before anything is written: a run whose task keel cannot rebuild is refused here
        from keel.train.scoring import scorer_for

        scorer = scorer_for(files, args.config, args.device, option="--eval")
    summary = average_checkpoints_to_file(files, args.out, prefix=args.prefix, dtype=args.dtype)
    inputs = summary["inputs"]
    print(f"averaged {len(inputs)} checkpoints ({summary['averaged_tensors']} tensors averaged, "
          f"{summary['copied_tensors']} copied from the newest) -> {args.out} ({summary['bytes']:,} bytes)")
    if scorer is None:
        for path in inputs:
            print(f"  {path}")
        return 0
    width = max(len(p) for p in [*inputs, args.out])
    print(f"  {'weights':<{width}}  val_loss")
    for path in inputs:
        print(f"  {path:<{width}}  {scorer.loss(path):.4f}")
    print(f"  {args.out:<{width}}  {scorer.loss(args.out):.4f}  (average)")
    return 0
