"""The ``cpt`` command line: parse, build, run, close. User mistakes print one line, no traceback."""

from __future__ import annotations

import argparse
import sys

from cpt import __version__
from cpt.errors import CptError
from cpt.preemption import EXIT_CODE, Preempted

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
    run.add_argument("--resume", action="store_true",
                     help="continue the recipe's run directory from its newest intact checkpoint")
    run.add_argument("--auto-resume", action="store_true",
                     help="resume if the run directory has a checkpoint, else start the run (what slurm jobs run)")
    run.add_argument("--workers", type=int, default=1, metavar="N", help="processes that tokenize (default 1)")

    resume = sub.add_parser("resume", help="continue a run from its newest intact checkpoint",
                            description="Continue RUN_DIR from its newest intact checkpoint (corrupt or partial ones "
                                        "are skipped) with the recipe it was started with: weights, optimizer, "
                                        "schedule step, data position, RNG and metrics continue exactly.")
    resume.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    resume.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="harmless overrides only (logging, eval)")

    branch = sub.add_parser("branch", help="start a new run from a checkpoint of another run",
                            description="Start a new run of RECIPE whose first stage starts from CHECKPOINT's weights "
                                        "(and tokenizer); the new run records its lineage.")
    branch.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/demo/checkpoints/cpt/step-350")
    branch.add_argument("recipe", help="recipe YAML for the new run (its model/tokenizer come from CHECKPOINT)")
    branch.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    branch.add_argument("--name", help="name of the new run (default: the recipe's name)")
    branch.add_argument("--overwrite", action="store_true", help="replace an existing run in the new run directory")
    branch.add_argument("--with-optimizer", action="store_true", help="also start from the checkpoint's AdamW state")
    branch.add_argument("--with-data", action="store_true",
                        help="also continue the checkpoint's data position (per-source cursors, replay buffer)")
    branch.add_argument("--workers", type=int, default=1, metavar="N", help="processes that tokenize (default 1)")

    export = sub.add_parser("export", help="write a checkpoint as a standalone Hugging Face model directory",
                            description="Copy CHECKPOINT's model and tokenizer into OUT_DIR, loadable with "
                                        "AutoModelForCausalLM.from_pretrained(OUT_DIR).")
    export.add_argument("checkpoint", help="a checkpoint directory")
    export.add_argument("out_dir", help="an empty or new directory")

    from cpt.merging.command import add_parser as add_merge_parser

    add_merge_parser(sub)

    runs = sub.add_parser("runs", help="list runs and their lineage as a tree")
    runs.add_argument("dir", nargs="?", default="runs", help="directory to search (default: runs)")

    prepare = sub.add_parser("prepare", help="train/load the tokenizer and tokenize the corpora into shards",
                             description="Resolve RECIPE's tokenizer and tokenize every corpus into token shards "
                                         "with a held-out split; reuses shards whose fingerprint matches.")
    prepare.add_argument("recipe", help="recipe YAML")
    prepare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    prepare.add_argument("--workers", type=int, default=1, metavar="N", help="processes that tokenize (default 1)")
    prepare.add_argument("--tasks", type=int, metavar="N", help="with --slurm: an array of N jobs; with --task: "
                         "the array's size")
    prepare.add_argument("--task", type=int, metavar="I", help="tokenize only part I of --tasks N (what array task "
                         "I runs); `cpt prepare` without it assembles the corpora")
    prepare.add_argument("--dry-run", action="store_true", help="with --slurm: print the scripts, submit nothing")

    check = sub.add_parser("check", help="validate a recipe and print the resolved config",
                           description="Load and validate RECIPE with overrides; print the resolved config.")
    check.add_argument("recipe", help="recipe YAML")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    report = sub.add_parser("report", help="(re)write the report of one run, or compare several",
                            description="Recompute each RUN_DIR's report from its metrics.jsonl: curves, the "
                                        "stability gap of every stage and eval set, continual-evaluation metrics, "
                                        "report/stability.json and a self-contained report/index.html. With "
                                        "several runs, also write a comparison page into --out.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/demo")
    report.add_argument("--out", metavar="DIR", help="one run: where its report goes (default RUN_DIR/report); "
                        "several: where the comparison goes (default FIRST_RUN_DIR/report/compare)")
    report.add_argument("--rtol", type=float, default=0.01,
                        help="recovered = back within max(atol, rtol*|baseline|) of the baseline (default 0.01)")
    report.add_argument("--atol", type=float, default=0.0, help="absolute recovery band in nats (default 0)")

    evaluate = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a checkpoint, offline",
                              description="Run EleutherAI lm-evaluation-harness TASKS on CHECKPOINT (a run's "
                                          "checkpoint or an exported model directory) with the Hub switched off. "
                                          "A run's eval sets are available as rolling-perplexity tasks cpt_<set> "
                                          "over their held-out documents; add local task YAMLs with --include. "
                                          "Results go to RUN_DIR/lm_eval/<stage>-step-<N>.json.")
    evaluate.add_argument("checkpoint", help="RUN_DIR/checkpoints/STAGE/step-N, or a `cpt export` directory")
    evaluate.add_argument("--lm-eval", dest="tasks", required=True, metavar="TASKS",
                          help="comma-separated task names, e.g. cpt_upstream,cpt_downstream")
    evaluate.add_argument("--include", action="append", default=[], metavar="DIR",
                          help="a directory of lm-eval task YAMLs over local files (repeatable)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="at most N documents per task")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    evaluate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--out", metavar="JSON", help="results file (default RUN_DIR/lm_eval/<stage>-step-<N>.json)")

    sweep = sub.add_parser("sweep", help="run a grid of small runs (sizes x token budgets x domain ratios) into a "
                                         "results table for the mixture-ratio laws",
                           description="Expand SWEEP.yaml's base recipe over model sizes, CPT token budgets and "
                                       "domain ratios; run what is not finished yet, one process each, and write one "
                                       "row per evaluation of each finished run to SWEEP_DIR/results.csv. Failed runs "
                                       "are recorded and retried on the next invocation.")
    sweep.add_argument("sweep", help="sweep YAML, e.g. recipes/sweep-demo.yaml")
    sweep.add_argument("--dry-run", action="store_true", help="print the runs' commands (with --slurm: the "
                       "scripts), run nothing")
    sweep.add_argument("--point", type=int, metavar="INDEX",
                       help="run only grid point INDEX (0-based, sizes x tokens x ratios in file order)")
    sweep.add_argument("--base", metavar="SIZE", help="run only the base run of SIZE (a name or a 0-based index)")
    sweep.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes that tokenize each run's data (default 1)")

    from cpt.laws.cli import add_commands as add_law_commands
    from cpt.slurm import add_commands as add_slurm_commands, add_slurm_options

    add_slurm_options(sweep)  # sweep --slurm: an array job
    add_slurm_options(prepare)  # prepare --slurm --tasks N: an array job, then the assembly
    add_law_commands(sub)  # fit-law, plan
    add_slurm_commands(sub)  # launch

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
    p = parser()
    args, extra = p.parse_known_args(argv)
    # KEY=VALUE overrides may also follow options (`cpt run R --resume a.b=1`), which argparse leaves over.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from cpt import runner

    try:
        if args.command == "run":
            runner.run(args.recipe, args.overrides, overwrite=args.overwrite, resume=args.resume,
                       auto_resume=args.auto_resume, workers=workers_count(args.workers))
        elif args.command == "resume":
            runner.resume(args.run_dir, args.overrides)
        elif args.command == "branch":
            runner.branch(args.checkpoint, args.recipe, args.overrides, name=args.name,
                          with_optimizer=args.with_optimizer, with_data=args.with_data, overwrite=args.overwrite,
                          workers=workers_count(args.workers))
        elif args.command == "export":
            from pathlib import Path

            from cpt.checkpoint import export_checkpoint

            print(export_checkpoint(Path(args.checkpoint), Path(args.out_dir)))
        elif args.command == "merge":
            from cpt.merging.command import run as merge

            print(merge(args))
        elif args.command == "runs":
            from pathlib import Path

            from cpt.runs import format_runs

            print(format_runs(Path(args.dir)))
        elif args.command == "prepare" and not args.slurm:
            from cpt.slurm import refuse_slurm_options

            refuse_slurm_options(args)
            runner.setup_logging()
            part = _part(args.task, args.tasks)
            data = runner.prepare_data(args.recipe, args.overrides, workers=workers_count(args.workers), part=part)
            for name, shard in (data.corpora.items() if data else ()):
                print(f"{name}: {shard.path}")
        elif args.command == "check":
            import yaml

            from cpt.recipe import load_recipe

            recipe, _ = load_recipe(args.recipe, args.overrides)
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        elif args.command == "report":
            from pathlib import Path

            from cpt.report import report_runs

            print(report_runs([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None,
                              rtol=args.rtol, atol=args.atol))
        elif args.command == "eval":
            from pathlib import Path

            from cpt import harness

            runner.setup_logging()
            out = harness.evaluate(Path(args.checkpoint), [t for t in args.tasks.split(",") if t],
                                   [Path(p) for p in args.include], Path(args.out) if args.out else None,
                                   limit=args.limit, batch_size=args.batch_size, device=args.device)
            print(harness.summary(out))
            print(out)
        elif args.command == "launch" or (args.command in ("sweep", "prepare") and args.slurm):  # sbatch
            from cpt.slurm import dispatch as slurm_dispatch

            runner.setup_logging()
            slurm_dispatch(args)
        elif args.command == "sweep":
            from cpt import sweep
            from cpt.slurm import refuse_slurm_options

            refuse_slurm_options(args)
            runner.setup_logging()
            workers = workers_count(args.workers)
            if args.point is not None:
                print(sweep.run_point(args.sweep, args.point, workers=workers))
            elif args.base is not None:
                sweep.run_base(args.sweep, args.base, workers=workers)
            else:
                print(sweep.run_sweep(args.sweep, dry_run=args.dry_run, workers=workers))
        elif args.command in ("fit-law", "plan"):
            from cpt.laws.cli import dispatch

            dispatch(args)
        elif args.command == "schedule":
            from cpt.schedule_view import show

            show(args.recipe, args.overrides, stage=args.stage, steps=args.steps, json_out=args.json,
                 global_steps=args.global_steps, plot_path=args.plot)
    except CptError as e:
        print(f"cpt: error: {e}", file=sys.stderr)
        return 2
    except Preempted:
        return EXIT_CODE  # the trainer logged where its checkpoint is
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130
    return 0


def _part(task: int | None, tasks: int | None) -> tuple[int, int] | None:
    """``--task I --tasks N`` as ``(I, N)``, checked; None without --task."""
    if task is None:
        if tasks is not None:
            raise CptError("--tasks N without --slurm needs --task I (one array task's part); drop it to prepare all")
        return None
    if tasks is None or tasks < 1 or not 0 <= task < tasks:
        raise CptError(f"--task {task}: expected 0 <= I < N with --tasks N, got --tasks {tasks}")
    return task, tasks


def workers_count(value: int) -> int:
    """``--workers``'s value, checked (the tokenizing processes of run, branch, prepare, sweep and launch)."""
    if value < 1:
        raise CptError(f"--workers: expected a positive number of processes, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
