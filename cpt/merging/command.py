"""``cpt merge``: read the inputs, check them, merge with ``arithmetic``, write a model (or sweep and evaluate)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cpt.errors import CptError

METHODS = ("linear", "average", "chat-vector", "task-arithmetic", "ties", "dare")


def add_parser(sub) -> None:
    """The ``merge`` subcommand and its methods, under ``sub`` (the top-level subparsers)."""
    merge = sub.add_parser("merge", help="merge models: interpolate, average checkpoints, add a chat vector, TIES/DARE",
                           description="Merge cpt checkpoints or Hugging Face model directories into a new HF "
                                       "directory (tokenizer copied, lineage and sha256 in merge.json). Interpolation "
                                       "sweeps evaluate each merge on a run's eval sets and add the trade-off to its "
                                       "report.")
    methods = merge.add_subparsers(dest="method", metavar="METHOD", required=True)

    linear = methods.add_parser("linear", help="(1 - alpha) BASE + alpha MODEL (WiSE-FT toward the starting weights)")
    linear.add_argument("--base", required=True, help="the alpha = 0 end, e.g. the stage's starting checkpoint")
    linear.add_argument("--model", required=True, help="the alpha = 1 end, e.g. the CPT run's final checkpoint")
    linear.add_argument("--alpha", type=float, help="weight of MODEL, in [0, 1]")
    linear.add_argument("--sweep", metavar="alpha=A,B,...", help="several alphas, e.g. alpha=0,0.25,0.5,0.75,1")
    linear.add_argument("--eval", metavar="RUN_DIR", type=Path,
                        help="with --sweep: evaluate each merge on RUN_DIR's eval sets (same tokens) and add the "
                             "table and plot to its report")
    linear.add_argument("--out", type=Path, help="a new directory (with --sweep: one alpha-A directory per alpha)")

    average = methods.add_parser("average", help="the mean of N checkpoints (e.g. a stage's last ones)")
    average.add_argument("inputs", nargs="*", type=Path, help="checkpoints or HF model directories")
    average.add_argument("--run", type=Path, help="instead of INPUTS: a run directory ...")
    average.add_argument("--stage", help="... its stage ...")
    average.add_argument("--last", type=int, help="... and how many of that stage's newest checkpoints")
    average.add_argument("--out", type=Path, required=True, help="a new directory")

    for name, help_text in (("chat-vector", "TARGET + lambda (ADD - SUBTRACT): an instruct model's chat vector added "
                                            "to a CPT model"),
                            ("task-arithmetic", "the same arithmetic under its general name")):
        vector = methods.add_parser(name, help=help_text)
        vector.add_argument("--target", required=True, help="the model the vector is added to (the CPT model)")
        vector.add_argument("--add", required=True, help="e.g. the instruct model")
        vector.add_argument("--subtract", required=True, help="e.g. its base (the CPT run's starting weights)")
        vector.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the vector (default 1)")
        vector.add_argument("--vocab", choices=("error", "target"), default="error",
                            help="a target with more vocabulary rows (grown tokenizer): refuse (error), or add the "
                                 "vector to the shared rows and keep the target's new rows (target)")
        vector.add_argument("--out", type=Path, required=True, help="a new directory")

    for name, option, default, help_text in (("ties", "--density", 0.2, "share of each task vector kept (0, 1]"),
                                             ("dare", "--drop", 0.9, "share of each task vector dropped [0, 1)")):
        task = methods.add_parser(name, help=f"{name.upper()}: task vectors MODEL - BASE combined and added to BASE")
        task.add_argument("models", nargs="+", type=Path, help="fine-tuned / continually pre-trained models")
        task.add_argument("--base", required=True, type=Path, help="the model they all started from")
        task.add_argument("--weights", help="comma-separated weight per model (default 1 each)")
        task.add_argument(option, type=float, default=default, help=f"{help_text} (default {default})")
        if name == "dare":
            task.add_argument("--seed", type=int, default=0, help="seed of the drop masks")
        task.add_argument("--out", type=Path, required=True, help="a new directory")


def run(args: argparse.Namespace) -> str:
    """Carry out ``cpt merge``; returns what to print. (torch is imported here, not when the parser is built.)"""
    from cpt.merging import arithmetic
    from cpt.merging.models import check_same_architecture, lineage, read_input, refuse_existing, write_output

    if args.method == "linear":
        return _linear(args)
    refuse_existing(args.out)  # before reading gigabytes of weights
    if args.method == "average":
        inputs = [read_input(p) for p in _average_inputs(args)]
        check_same_architecture(inputs)
        state = arithmetic.weighted_average([i.state for i in inputs], [1 / len(inputs)] * len(inputs))
        record = lineage("average", {"inputs": inputs}, weights=[1 / len(inputs)] * len(inputs))
        like = inputs[-1]
    elif args.method in ("chat-vector", "task-arithmetic"):
        target, add, subtract = read_input(args.target), read_input(args.add), read_input(args.subtract)
        check_same_architecture([target, add, subtract], vocabulary=False)
        state = arithmetic.task_arithmetic(target.state, add.state, subtract.state, args.lam, args.vocab)
        record = lineage(args.method, {"target": target, "add": add, "subtract": subtract}, **{"lambda": args.lam},
                         vocab=args.vocab)
        like = target
    else:
        base, models = read_input(args.base), [read_input(p) for p in args.models]
        check_same_architecture([base, *models])
        weights = _weights(args.weights, len(models))
        if args.method == "ties":
            state = arithmetic.ties(base.state, [m.state for m in models], weights, args.density)
            params = {"density": args.density}
        else:
            state = arithmetic.dare(base.state, [m.state for m in models], weights, args.drop, args.seed)
            params = {"drop": args.drop, "seed": args.seed}
        record = lineage(args.method, {"base": base, "models": models}, weights=weights, **params)
        like = models[0]
    return str(write_output(args.out, state, like, record))


def _linear(args: argparse.Namespace) -> str:
    from cpt.merging import arithmetic
    from cpt.merging.models import check_same_architecture, lineage, read_input, refuse_existing, write_output
    from cpt.merging.sweep import format_sweep, parse_alphas, sweep

    if (args.alpha is None) == (args.sweep is None):
        raise CptError("cpt merge linear: give --alpha A (one merge) or --sweep alpha=A,B,... (several)")
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise CptError(f"--alpha must be in [0, 1], got {args.alpha}")
    alphas = parse_alphas(args.sweep) if args.sweep else [args.alpha]
    if args.out is not None:
        refuse_existing(args.out)
    if args.alpha is not None and args.out is None:
        raise CptError("cpt merge linear --alpha needs --out DIR (a new directory)")
    if args.eval is not None and args.sweep is None:
        raise CptError("--eval goes with --sweep; to evaluate one merge, give --sweep alpha=A")
    base, model = read_input(args.base), read_input(args.model)
    check_same_architecture([base, model])
    if args.sweep is None:
        state = arithmetic.weighted_average([base.state, model.state], [1 - args.alpha, args.alpha])
        return str(write_output(args.out, state, model, lineage("linear", {"base": base, "model": model},
                                                                 alpha=args.alpha)))
    rows = sweep(base, model, alphas, args.eval, args.out)
    if args.eval is None:
        return "\n".join(str(args.out / f"alpha-{r['alpha']:g}") for r in rows)
    sets = [k for k in rows[0] if k != "alpha" and not k.endswith("_bpb")]
    return format_sweep({"base": str(base.path), "model": str(model.path), "sets": sets, "rows": rows}) + f"\nwritten to {args.eval / 'report'} (cpt report {args.eval} shows it)"


def _average_inputs(args: argparse.Namespace) -> list[Path]:
    if args.run is None:
        if args.stage or args.last:
            raise CptError("--stage and --last go with --run RUN_DIR")
        if len(args.inputs) < 2:
            raise CptError(f"average needs at least 2 models, got {len(args.inputs)}")
        return args.inputs
    if args.inputs or not args.stage or not args.last:
        raise CptError("give either INPUTS or --run RUN_DIR --stage NAME --last K")
    if args.last < 2:
        raise CptError(f"--last must be at least 2, got {args.last}")
    from cpt.checkpoint import list_checkpoints

    found = [path for meta, path in list_checkpoints(args.run) if meta["stage"] == args.stage]
    if len(found) < args.last:
        raise CptError(f"stage '{args.stage}' of {args.run} has {len(found)} checkpoints, fewer than --last {args.last}")
    return found[-args.last:]


def _weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CptError(f"--weights: '{text}' is not a comma-separated list of numbers") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise CptError(f"--weights needs {count} finite numbers (one per model), got '{text}'")
    return weights
