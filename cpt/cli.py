"""The ``cpt`` command line: parse, build, run, close. User mistakes print one line, no traceback."""

from __future__ import annotations

import argparse
import sys

from cpt import __version__
from cpt.errors import CptError

OVERRIDES_HELP = "dotted key=value overrides, e.g. train.max_steps=20 run.dir=runs/quick stages.cpt.steps=50"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt", description="Continual pre-training of language models: data mixing, "
                                "replay, re-warmed schedules and forgetting measured while it happens.")
    p.add_argument("--version", action="version", version=f"cpt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="prepare data, train every stage, evaluate and write a report",
                         description="Prepare data (cached), train every stage of RECIPE, evaluate the eval sets, "
                                     "and write RUN_DIR/metrics.jsonl, checkpoints and report/.")
    run.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing run in RUN_DIR (its prepared data is reused)")

    prepare = sub.add_parser("prepare", help="train/load the tokenizer and tokenize the corpora into shards",
                             description="Resolve RECIPE's tokenizer and tokenize every corpus into token shards "
                                         "with a held-out split; reuses shards whose fingerprint matches.")
    prepare.add_argument("recipe", help="recipe YAML")
    prepare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    check = sub.add_parser("check", help="validate a recipe and print the resolved config",
                           description="Load and validate RECIPE with overrides; print the resolved config.")
    check.add_argument("recipe", help="recipe YAML")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    schedule = sub.add_parser("schedule", help="print (or plot) every stage's learning rate at chosen steps",
                              description="Print the learning rate of every stage of RECIPE at chosen steps, "
                                          "without reading data; optionally plot all stages over global steps.")
    schedule.add_argument("recipe", help="recipe YAML")
    schedule.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    schedule.add_argument("--stage", metavar="NAME", help="only this stage")
    schedule.add_argument("--steps", metavar="0,10,100",
                          help="steps to print (default: ~10 evenly spaced steps and the phase ends of each stage)")
    schedule.add_argument("--global", dest="global_steps", action="store_true",
                          help="steps are the run's global steps, not each stage's own")
    schedule.add_argument("--json", action="store_true", help="print {stage: {step: lr}} as JSON")
    schedule.add_argument("--plot", metavar="PNG", help="also draw every stage over global steps into this PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from cpt import runner

    try:
        if args.command == "run":
            runner.run(args.recipe, args.overrides, overwrite=args.overwrite)
        elif args.command == "prepare":
            runner.setup_logging()
            data = runner.prepare_data(args.recipe, args.overrides)
            for name, shard in data.corpora.items():
                print(f"{name}: {shard.path}")
        elif args.command == "check":
            import yaml

            from cpt.recipe import load_recipe

            recipe, _ = load_recipe(args.recipe, args.overrides)
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        elif args.command == "schedule":
            from cpt.schedule_view import show

            show(args.recipe, args.overrides, stage=args.stage, steps=args.steps, json_out=args.json,
                 global_steps=args.global_steps, plot_path=args.plot)
    except CptError as e:
        print(f"cpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
