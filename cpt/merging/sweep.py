"""The forgetting/adaptation trade-off of a merge, measured: interpolate ``(1 - alpha) base + alpha model`` for each
alpha and evaluate every merged model on a run's upstream and downstream eval sets, the same token windows the
run evaluates (``build_eval_sets``), with its precision; the table and the Pareto plot go into the run's report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cpt.errors import CptError
from cpt.merging.arithmetic import weighted_average
from cpt.merging.models import MergeInput, lineage, write_output

SWEEP_FILE = "merge-sweep"


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,0.5"`` (or ``"alpha=0,0.25,0.5"``) as a list, each in [0, 1]."""
    body = text.split("=", 1)[1] if text.startswith("alpha=") else text
    try:
        alphas = [float(a) for a in body.split(",") if a.strip()]
    except ValueError:
        raise CptError(f"--sweep: '{text}' is not a comma-separated list of numbers, e.g. alpha=0,0.5,1") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise CptError(f"--sweep: every alpha must be in [0, 1], got {text}")
    return alphas


def sweep(base: MergeInput, model: MergeInput, alphas: list[float], run_dir: Path | None,
          out: Path | None) -> list[dict]:
    """Merge at each alpha; keep each model under ``out/alpha-A`` when ``out`` is given; evaluate each on
    ``run_dir``'s eval sets when it is given and write ``run_dir/report/merge-sweep.{json,md,png}``."""
    from transformers import AutoModelForCausalLM

    if run_dir is None and out is None:
        raise CptError("--sweep needs --eval RUN_DIR (evaluate each merge) or --out DIR (keep each merge), or both")
    evaluator = _Evaluator(run_dir) if run_dir is not None else None
    net = (AutoModelForCausalLM.from_pretrained(model.path, local_files_only=True, dtype=torch.float32)
           if evaluator else None)
    rows = []
    for alpha in alphas:
        state = weighted_average([base.state, model.state], [1 - alpha, alpha])
        row = {"alpha": alpha}
        if out is not None:
            write_output(out / f"alpha-{alpha:g}", state, model,
                         lineage("linear", {"base": base, "model": model}, alpha=alpha))
        if evaluator is not None:
            net.load_state_dict(_with_tied_head(net, state))
            row.update(evaluator(net))
        rows.append(row)
    if evaluator is not None:
        evaluator.write(rows, base, model)
    return rows


def _with_tied_head(net, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every name of ``net``'s shared input/output embedding filled in: tied models save the tensor
    once (under either name), and an older config.json may not say that they are tied."""
    head, embed = net.get_output_embeddings(), net.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return state
    shared = [n for n, p in net.named_parameters(remove_duplicate=False) if p is embed.weight]
    present = [n for n in shared if n in state]
    if not present:
        return state  # load_state_dict names what is missing
    return {**{n: state[present[0]] for n in shared}, **state}


class _Evaluator:
    """A run's eval sets and precision, to evaluate merged models as the run evaluated its own."""

    def __init__(self, run_dir: Path):
        from accelerate import Accelerator

        from cpt.evaluate import build_eval_sets
        from cpt.runner import resolve_precision, run_recipe_and_data

        self.run_dir = run_dir
        self.recipe, data = run_recipe_and_data(run_dir)
        self.sets = build_eval_sets(self.recipe, data)
        if not self.sets:
            raise CptError(f"{run_dir} has no eval sets (eval.sets in its recipe) to evaluate merges on")
        self.vocab = len(data.tokenizer)
        self.accelerator = Accelerator(mixed_precision=resolve_precision(self.recipe.train.mixed_precision))

    def __call__(self, net) -> dict:
        from cpt.evaluate import evaluate

        rows = net.get_input_embeddings().weight.shape[0]
        if rows < self.vocab:
            raise CptError(f"the merged model has {rows} embedding rows but the run's tokenizer {self.vocab} tokens; "
                           "evaluate on a run that used this model's tokenizer")
        net.to(self.accelerator.device)
        out = {}
        for name, eval_set in self.sets.items():
            result = evaluate(net, eval_set, self.recipe.eval.batch_size, self.accelerator)
            out[name] = result["loss"]
            out[f"{name}_bpb"] = result["bpb"]
        return out

    def write(self, rows: list[dict], base: MergeInput, model: MergeInput) -> None:
        from cpt.plots import plot_merge_sweep

        report = self.run_dir / "report"
        report.mkdir(parents=True, exist_ok=True)
        names = list(self.sets)
        record = {"base": str(base.path.resolve()), "model": str(model.path.resolve()), "sets": names,
                  "tags": {n: s.tag for n, s in self.sets.items()}, "rows": rows}
        (report / f"{SWEEP_FILE}.json").write_text(json.dumps(record, indent=2) + "\n")
        (report / f"{SWEEP_FILE}.md").write_text(format_sweep(record))
        plot_merge_sweep(record, report / f"{SWEEP_FILE}.png")


def format_sweep(record: dict) -> str:
    """The sweep as a Markdown table: alpha, each set's loss and bits-per-byte."""
    names = record["sets"]
    header = "| alpha | " + " | ".join(f"{n} loss | {n} bpb" for n in names) + " |"
    lines = [f"Interpolation `(1 - alpha) base + alpha model`; base `{record['base']}`, model `{record['model']}`.",
             "", header, "|---:|" + "---:|---:|" * len(names)]
    for row in record["rows"]:
        lines.append(f"| {row['alpha']:g} | " + " | ".join(f"{row[n]:.4f} | {row[n + '_bpb']:.4f}" for n in names)
                     + " |")
    return "\n".join(lines) + "\n"
