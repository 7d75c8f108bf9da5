"""Half Fine-Tuning (HFT) masks and freezing by name pattern: plain functions over a model's parameters.

HFT (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models") freezes half of each transformer
layer at category level and draws a fresh random half for every stage. The rule used here, for each category
(attention matrices, MLP matrices, norms) with ``n`` modules in a layer: a random half of the layers (rounded
down) trains ``ceil(n / 2)`` of them and the other layers train ``floor(n / 2)``, the modules chosen at random
per layer. For Llama this is exactly the paper's recipe: 2 of {q, k, v, o} in every layer; 2 of {gate, up, down}
in half the layers and 1 in the others; and "half the norms" is 1 of {input_layernorm, post_attention_layernorm}
per layer. Parameters outside the targeted modules (embeddings, final norm, lm_head) are not touched.

A selection is a JSON-serialisable ``{parameter name: trainable}`` dict, so a checkpoint can record it and a
resumed stage applies the same mask instead of drawing a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from cpt.config import ConfigValueError, check, field, suggest
from cpt.errors import CptError

CATEGORIES = ("attention", "mlp", "norms")


@dataclass
class HFTConfig:
    seed: int = field(0, doc="seed of the random selection (re-drawn per stage: combined with the stage index)")
    attention: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                 doc="attention matrix names (module name suffixes, e.g. 'attn.c_proj') of one layer")
    mlp: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
                           doc="MLP matrix names (module name suffixes) of one layer")
    norms: list[str] = field(default_factory=lambda: ["input_layernorm", "post_attention_layernorm"],
                             doc="norm names (module name suffixes) of one layer")
    layers_pattern: str = field(r"layers\.(\d+)\.", doc="regex whose group 1 is the layer index in parameter names")

    def __post_init__(self):
        check(self.seed >= 0, "seed", f"must be a non-negative integer, got {self.seed}")
        seen: dict[str, str] = {}
        for category in CATEGORIES:
            for name in getattr(self, category):
                check(bool(name) and not name.startswith(".") and not name.endswith("."), category,
                      f"{name!r} is not a module name suffix; expected e.g. 'q_proj' or 'attn.c_proj'")
                check(name not in seen, category, f"{name!r} is already listed under {seen.get(name)}; "
                      "a module belongs to one category")
                seen[name] = category
        check(bool(seen), "attention", "attention, mlp and norms are all empty; HFT needs modules to select from")
        try:
            groups = re.compile(self.layers_pattern).groups
        except re.error as e:
            raise ConfigValueError("layers_pattern", f"is not a valid regular expression ({e})") from None
        check(groups >= 1, "layers_pattern",
              f"{self.layers_pattern!r} needs a group capturing the layer index, e.g. r'layers\\.(\\d+)\\.'")


@dataclass(frozen=True)
class _Target:
    """One targeted module of one layer and the names of its parameters (weight, and bias if any)."""
    layer: int
    category: str
    name: str
    params: tuple[str, ...]


def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _matches(module: str, suffix: str) -> bool:
    return module == suffix or module.endswith("." + suffix)


def _unrecognised(names: list[str], config: HFTConfig, problem: str) -> CptError:
    """The error for a model whose module names the config does not map, with what to write instead."""
    looked_for = "; ".join(f"{c}: {getattr(config, c)}" for c in CATEGORIES)
    layer_re = re.compile(config.layers_pattern)
    first = next((m for n in names if (m := layer_re.search(n))), None)
    if first is not None:
        in_first = [(n, m) for n in names if (m := layer_re.search(n)) and m.group(1) == first.group(1)]
        example = [n for n, _ in in_first]
        modules = dict.fromkeys(_module_of(n)[m.end():] for n, m in in_first)
        hint = f"; the modules of layer {first.group(1)} are {', '.join(m for m in modules if m)}"
    else:
        example = names
        # Guess the layer numbering from the first "<word>.<number>." in the names.
        stacked = next((m for n in names if (m := re.search(r"(\w+)\.(\d+)\.", n))), None)
        hint = (f"; layers look numbered as '{stacked.group(0)}', so try layers_pattern: "
                f"'{re.escape(stacked.group(1))}\\.(\\d+)\\.'" if stacked else "")
    return CptError(
        f"HFT does not recognise this model's module names: {problem}. It looked for {looked_for} in layers "
        f"matching layers_pattern {config.layers_pattern!r}. Parameter names look like {', '.join(example[:6])}"
        f"{hint}. Map them in the recipe as hft: {{attention: [...], mlp: [...], norms: [...], layers_pattern: "
        "'...'} with module name suffixes (a dotted suffix such as 'mlp.c_proj' tells apart modules that share "
        "a last name)"
    )


def _targets(model: torch.nn.Module, config: HFTConfig) -> list[_Target]:
    """The targeted modules of every layer, in layer order and, within a layer, in the config's name order."""
    names = [n for n, _ in model.named_parameters()]
    layer_re = re.compile(config.layers_pattern)
    suffixes = [(c, s) for c in CATEGORIES for s in getattr(config, c)]
    found: dict[tuple[int, str], list[str]] = {}  # (layer, suffix) -> parameter names
    modules: dict[tuple[int, str], str] = {}  # (layer, suffix) -> module, to catch a suffix matching two modules
    layers_seen = False
    for name in names:
        m = layer_re.search(name)
        if m is None:
            continue
        layers_seen = True
        try:
            layer = int(m.group(1))
        except (TypeError, ValueError):
            raise CptError(f"hft.layers_pattern {config.layers_pattern!r}: group 1 must capture a layer number, "
                           f"got {m.group(1)!r} in '{name}'") from None
        module = _module_of(name)
        hits = [s for _, s in suffixes if _matches(module, s)]
        if len(hits) > 1:
            raise CptError(f"hft: module '{module}' matches several names {hits}; use a longer dotted suffix so "
                           "each module matches one name")
        if not hits:
            continue
        key = (layer, hits[0])
        if modules.setdefault(key, module) != module:
            raise CptError(f"hft: name '{hits[0]}' matches both '{modules[key]}' and '{module}' in layer {layer}; "
                           "use a longer dotted suffix (e.g. 'mlp.c_proj') so it names one module per layer")
        found.setdefault(key, []).append(name)
    if not layers_seen:
        raise _unrecognised(names, config, f"layers_pattern {config.layers_pattern!r} matches no parameter name")
    missing = [s for _, s in suffixes if not any(key[1] == s for key in found)]
    if missing:
        raise _unrecognised(names, config, f"no module matches {missing}")
    category_of = dict((s, c) for c, s in suffixes)
    order = {s: i for i, (_, s) in enumerate(suffixes)}
    return [_Target(layer, category_of[s], s, tuple(params))
            for (layer, s), params in sorted(found.items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))]


def hft_selection(model: torch.nn.Module, config: HFTConfig, stage_index: int) -> dict[str, bool]:
    """Draw a Half Fine-Tuning mask for one stage.

    Per category with ``n`` modules in a layer, a random half of the layers (rounded down) trains
    ``ceil(n / 2)`` and the others ``floor(n / 2)`` (see the module docstring); a module's weight and bias
    share its decision.

    Args:
        model: the model whose parameter names are matched against ``config``.
        config: the module names of each category and the layer-index regex.
        stage_index: the stage's position in the recipe; with ``config.seed`` it seeds the draw, so each stage
            gets its own selection and the same (seed, stage) always gets the same one.

    Returns:
        ``{parameter name: trainable}`` for every parameter of a targeted module, in the model's order.
        Parameters not in it (embeddings, final norm, lm_head) are left as they are: trainable by default.

    Raises:
        CptError: the model's module names or layers are not recognised under ``config``.
    """
    if isinstance(stage_index, bool) or not isinstance(stage_index, int) or stage_index < 0:
        raise ValueError(f"stage_index must be a non-negative integer, got {stage_index!r}")
    targets = _targets(model, config)
    # Its own generator, seeded from (seed, stage) through numpy's SeedSequence, independent of the global RNGs.
    # A resumed stage applies the selection recorded in its checkpoint, never a re-draw.
    rng = np.random.default_rng([config.seed, stage_index])
    trainable: dict[str, bool] = {}
    for category in CATEGORIES:
        by_layer: dict[int, list[_Target]] = {}
        for t in targets:
            if t.category == category:
                by_layer.setdefault(t.layer, []).append(t)
        layers = sorted(by_layer)
        more = {layers[i] for i in rng.permutation(len(layers))[: len(layers) // 2]}
        for layer in layers:
            group = by_layer[layer]
            k = (len(group) + 1) // 2 if layer in more else len(group) // 2
            chosen = set(rng.permutation(len(group))[:k].tolist())
            for i, t in enumerate(group):
                trainable.update(dict.fromkeys(t.params, i in chosen))
    return {name: trainable[name] for name, _ in model.named_parameters() if name in trainable}


def _check_names(model: torch.nn.Module, selection: dict[str, bool]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    unknown = [n for n in selection if n not in params]
    if unknown:
        raise CptError(f"the trainable-parameter selection names {len(unknown)} parameters this model does not "
                       f"have, e.g. '{unknown[0]}'{suggest(unknown[0], params)}; it was made for another model")
    return params


def apply_trainable(model: torch.nn.Module, selection: dict[str, bool]) -> None:
    """Set ``requires_grad`` of each parameter named in ``selection``; others are left as they are.

    Raises:
        CptError: the selection names a parameter the model does not have (e.g. a mask from another model).
    """
    params = _check_names(model, selection)
    for name, train in selection.items():
        params[name].requires_grad_(bool(train))


def freeze_patterns(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter whose name matches one of ``patterns`` (``re.search``).

    Example: ``["embed_tokens", r"layers\\.[01]\\."]`` freezes the embeddings and the bottom two layers.
    Tied weights are one parameter: with tied embeddings, freezing ``embed_tokens`` freezes ``lm_head`` too.

    Returns:
        The names of the frozen parameters, in the model's order.

    Raises:
        CptError: a pattern is not a valid regex or matches no parameter (with close parameter names).
    """
    names = [n for n, _ in model.named_parameters()]
    hit: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise CptError(f"freeze pattern {pattern!r} is not a valid regular expression: {e}") from None
        matched = {n for n in names if regex.search(n)}
        if not matched:
            # Compare the pattern's words with the dotted parts of the names: a pattern is usually one part.
            parts = {p for n in names for p in n.split(".") if not p.isdigit()}
            words = sorted(re.findall(r"[A-Za-z_]{3,}", pattern), key=len, reverse=True)
            hint = next((h for w in words if w not in parts and (h := suggest(w, sorted(parts)))), "")
            raise CptError(f"freeze pattern {pattern!r} matches no parameter{hint}; parameter names look like "
                           f"{', '.join(names[:3])}")
        hit |= matched
    for name, param in model.named_parameters():
        if name in hit:
            param.requires_grad_(False)
    return [n for n in names if n in hit]


def selection_summary(model: torch.nn.Module, selection: dict[str, bool],
                      config: Optional[HFTConfig] = None) -> dict:
    """Counts of an HFT selection, for the log and for checking that about half is trained.

    Args:
        model: the model the selection was drawn for.
        selection: from :func:`hft_selection`.
        config: the config it was drawn with (module names and layer regex); default ``HFTConfig()``.

    Returns:
        ``matrices`` (attention and MLP modules), ``modules`` (those and the norms) and ``elements`` (parameter
        elements of all targeted modules), each ``{"trained": int, "total": int}``; ``categories`` with the same
        counts per category; and ``layers``, one ``{"layer", "trained", "frozen"}`` entry of module names per layer.

    Raises:
        CptError: the selection does not cover exactly the targeted parameters of this model under ``config``.
    """
    config = config or HFTConfig()
    params = _check_names(model, selection)
    targets = _targets(model, config)
    covered = {n for t in targets for n in t.params}
    if covered != set(selection):
        raise CptError(f"the HFT selection covers {len(selection)} parameters but this model has {len(covered)} "
                       "targeted ones under the hft config; it was drawn for another model or config")

    def counts() -> dict[str, int]:
        return {"trained": 0, "total": 0}

    matrices, modules, elements = counts(), counts(), counts()
    categories = {c: counts() for c in CATEGORIES}
    layers: dict[int, dict] = {}
    for t in targets:
        train = selection[t.params[0]]
        numel = sum(params[n].numel() for n in t.params)
        tallies = [modules, categories[t.category]] + ([matrices] if t.category != "norms" else [])
        for tally in tallies:
            tally["total"] += 1
            tally["trained"] += int(train)
        elements["total"] += numel
        elements["trained"] += numel if train else 0
        entry = layers.setdefault(t.layer, {"layer": t.layer, "trained": [], "frozen": []})
        entry["trained" if train else "frozen"].append(t.name)
    return {"matrices": matrices, "modules": modules, "elements": elements, "categories": categories,
            "layers": [layers[k] for k in sorted(layers)]}
