"""How a run looks in the report's plots: one colour per base method (the same across a report's plots), a
marker per variant (weave's pooling), and for lines a marker and linestyle of their own, so that no two
series look alike in colour, nor in greyscale."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.experiment.store import Row

# tab10 less its grey (black and grey are kept for references such as the base model), then darker shades
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.", ":")
REFERENCE = "#000000"  # the base model


@dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str = "-"


def _param(row: Row, name: str) -> Any:
    """A hyperparameter as run: the configured value, else the method's resolved default."""
    params, hparams = row.config.get("params") or {}, row.config.get("hparams") or {}
    return params[name] if name in params else hparams.get(name)


def base_method(row: Row) -> str:
    """The method a run's numbers belong with: a weave run's woven (inner) method, else the run's own."""
    inner = _param(row, "inner") if row.method == "weave" else None
    return str(inner) if inner else row.method


def variant(row: Row) -> str:
    """What sets a run apart from its base method's plain run: weave and its pooling ('' for a plain run)."""
    if row.method != "weave":
        return ""
    return f"weave, pooling={_param(row, 'pooling') or 'average'}"


def is_base_model(row: Row) -> bool:
    """Task arithmetic with scaling 0 adds nothing to the base model: its scores are the base model's."""
    scaling = _param(row, "scaling")
    return row.method == "task_arithmetic" and isinstance(scaling, (int, float)) and float(scaling) == 0.0


def palette(names: Iterable[str]) -> dict[str, str]:
    """A colour per base method, first seen first; built once per report so a method keeps its colour."""
    return {name: COLOURS[k % len(COLOURS)] for k, name in enumerate(dict.fromkeys(names))}


def colour_of(base: str, colours: Mapping[str, str]) -> str:
    return colours.get(base) or COLOURS[sum(map(ord, base)) % len(COLOURS)]  # a name the palette lacks


def dot_styles(keys: Sequence[tuple[str, str]], colours: Mapping[str, str]) -> list[Style]:
    """Styles of ``(base method, variant)`` series drawn as dots: colour by base method, marker by variant
    (first seen first); two runs of one base method and variant get the next free marker, so every
    (colour, marker) pair is drawn once."""
    variants = list(dict.fromkeys(v for _, v in keys))
    taken: set[tuple[str, str]] = set()
    out = []
    for base, var in keys:
        colour = colour_of(base, colours)
        k = variants.index(var)
        free = [MARKERS[(k + j) % len(MARKERS)] for j in range(len(MARKERS))
                if (colour, MARKERS[(k + j) % len(MARKERS)]) not in taken]
        marker = free[0] if free else MARKERS[k % len(MARKERS)]  # more than 12 alike: nothing left to vary
        taken.add((colour, marker))
        out.append(Style(colour, marker, "none"))
    return out


def line_styles(bases: Sequence[str], colours: Mapping[str, str]) -> list[Style]:
    """Styles of lines: colour by base method, and each line its own (marker, linestyle) pair (unique for up
    to 48 lines: the linestyle shifts by one each time the markers wrap), readable in greyscale."""
    return [Style(colour_of(base, colours), MARKERS[k % len(MARKERS)],
                  LINESTYLES[(k + k // len(MARKERS)) % len(LINESTYLES)]) for k, base in enumerate(bases)]


def reference_styles(bases: Sequence[str], colours: Mapping[str, str]) -> list[Style]:
    """Styles of horizontal reference lines (baselines): no marker, so they differ from the data lines in
    greyscale, and each its own linestyle (dashed first)."""
    order = ("--", ":", "-.", "-")
    return [Style(colour_of(base, colours), "none", order[k % len(order)]) for k, base in enumerate(bases)]
