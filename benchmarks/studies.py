"""The papers' claims against the committed studies: one pivot table and one verdict per claim.

Reads the sweeps that `examples/sweeps/*_cpu.yaml` wrote under `benchmarks/results/` (run them with
`loraprune sweep examples/sweeps/NAME.yaml`) and the N:M benchmark's `semi_structured.json`, and
writes `benchmarks/results/studies.{json,md}`. Nothing is trained here: every number is read from
those files, and every verdict is computed from those numbers by the rule stated beside it.

    python benchmarks/studies.py [--results benchmarks/results]

A study whose sweep is missing or unfinished is listed as such: its table shows the points that
finished and its verdict is "incomplete".
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loraprune.io import write_json
from loraprune.run_report.document import markdown_table as table_markdown

CRITERIA = ("obs", "taylor", "magnitude", "wanda", "sparsegpt")
GRADIENT_BASED = ("obs", "taylor")
ACTIVATION_BASED = ("wanda", "sparsegpt")


class Sweep:
    """The finished points of one committed sweep."""

    def __init__(self, directory: Path):
        self.directory = directory
        data = json.loads((directory / "sweep.json").read_text()) if (directory / "sweep.json").exists() else {}
        self.command: str = data.get("command", "")
        self.total = len(data.get("points", []))
        self.points: list[dict[str, Any]] = [p for p in data.get("points", []) if p["status"] == "ok"]

    @property
    def done(self) -> str:
        """How far the sweep got, and the command that ran it."""
        if not self.total:
            return f"not run (`{self.directory.name}` has no results yet)"
        return f"{len(self.points)} of {self.total} points; `{self.command}`"

    def value(self, metric: str, **settings: Any) -> float | None:
        """`metric` of the point whose settings include `settings` (axis names with '.' written as '__')."""
        wanted = {key.replace("__", "."): value for key, value in settings.items()}
        for point in self.points:
            if all(_same(point["settings"].get(key), value) for key, value in wanted.items()):
                return point["metrics"].get(metric)
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) < 1e-9
    return a == b


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The run reports' Markdown table, as lines."""
    return table_markdown(header, rows).split("\n")


def pivot(
    sweep: Sweep,
    metric: str,
    rows: tuple[str, Sequence[Any]],
    columns: tuple[str, Sequence[Any]],
    column_label: Callable[[Any], str] = str,
    row_label: str | None = None,
) -> tuple[list[str], dict[Any, dict[Any, float | None]]]:
    """A rows x columns markdown table of `metric` (the lowest of each column in bold) and its values."""
    row_axis, row_values = rows
    column_axis, column_values = columns
    values = {r: {c: sweep.value(metric, **{row_axis: r, column_axis: c}) for c in column_values} for r in row_values}
    best = {c: min((values[r][c] for r in row_values if values[r][c] is not None), default=None) for c in column_values}
    body = []
    for r in row_values:
        cells = []
        for c in column_values:
            text = _fmt(values[r][c])
            cells.append(f"**{text}**" if values[r][c] is not None and values[r][c] == best[c] else text)
        body.append([str(r), *cells])
    header = [row_label or row_axis.split("__")[-1], *(column_label(c) for c in column_values)]
    return markdown_table(header, body), values


def rank_criteria_study(sweeps: dict[int, Sweep]) -> tuple[list[str], list[dict[str, Any]]]:
    """PrunedLoRA: its score against the other criteria, and gradient- against activation-based scores."""
    fractions = (0.5, 0.75, 0.875, 0.9375)
    lines, verdicts = [], []
    wins = columns = 0
    robustness: dict[str, list[float]] = {"gradient": [], "activation": []}
    high_sparsity: dict[str, list[float]] = {"gradient": [], "activation": []}
    pairs: list[str] = []  # like for like: with a recovery update (obs, sparsegpt), without (taylor, wanda)
    for r0, sweep in sweeps.items():
        table, values = pivot(
            sweep,
            "test_nll",
            ("rank_pruning__criterion", CRITERIA),
            ("rank_pruning__removed_fraction", fractions),
            column_label=lambda f, r0=r0: f"{f:g} removed (rank {round(r0 * (1 - f))})",
            row_label="criterion",
        )
        lines += [f"r0 = {r0} ({sweep.done}): test NLL (the lowest of each column in bold)", "", *table, ""]
        for f in fractions:
            column = {c: values[c][f] for c in CRITERIA if values[c][f] is not None}
            if len(column) == len(CRITERIA):
                columns += 1
                wins += min(column, key=column.get) == "obs"
        top = fractions[-1]
        pairs += [
            f"r0 {r0}: {g} {_fmt(values[g][top])} vs {a} {_fmt(values[a][top])}"
            for g, a in zip(GRADIENT_BASED, ACTIVATION_BASED[::-1])
        ]
        for group, members in (("gradient", GRADIENT_BASED), ("activation", ACTIVATION_BASED)):
            for c in members:
                low, high = values[c][fractions[0]], values[c][fractions[-1]]
                if low is not None and high is not None:
                    robustness[group].append(high - low)
                    high_sparsity[group].append(high)
    complete = columns == len(sweeps) * len(fractions)
    verdicts.append(
        {
            "claim": "PrunedLoRA's loss-aware score beats existing structured-pruning criteria (magnitude, Taylor, "
            "Wanda, SparseGPT) for rank components",
            "rule": "obs has the lowest test NLL in a majority of the (r0, removed fraction) columns with all five "
            "criteria finished",
            "evidence": f"obs lowest in {wins} of {columns} columns",
            "verdict": _verdict(complete, wins * 2 > columns),
        }
    )
    gradient = statistics.mean(robustness["gradient"]) if complete else None
    activation = statistics.mean(robustness["activation"]) if complete else None
    verdicts.append(
        {
            "claim": "gradient-based pruning (obs, Taylor) is more robust to high pruning ratios than activation-based "
            "pruning (Wanda, SparseGPT)",
            "rule": "mean NLL increase from 50 % to 93.75 % removed is smaller for the gradient-based criteria",
            "evidence": (
                f"mean increase gradient-based {_fmt(gradient)} vs activation-based {_fmt(activation)}; "
                f"mean NLL at 93.75 % removed {_fmt(statistics.mean(high_sparsity['gradient']))} vs "
                f"{_fmt(statistics.mean(high_sparsity['activation']))}; like for like at 93.75 % removed: "
                + "; ".join(pairs)
            )
            if complete
            else "not finished",
            "verdict": _verdict(complete, complete and gradient < activation),
        }
    )
    return lines, verdicts


def seed_spread_study(seed0: Sweep, seed1: Sweep) -> tuple[list[str], list[dict[str, Any]]]:
    """The same criteria points with another seed: how large the differences between runs are."""
    ends = (0.5, 0.9375)
    pairs = {
        (c, f): [
            s.value("test_nll", rank_pruning__criterion=c, rank_pruning__removed_fraction=f) for s in (seed0, seed1)
        ]
        for c in CRITERIA
        for f in ends
    }
    rows = [[c, *(_fmt(v) for f in ends for v in pairs[c, f])] for c in CRITERIA]
    header = ["criterion", "50 % seed 0", "50 % seed 1", "93.75 % seed 0", "93.75 % seed 1"]
    lines = [seed1.done, "", *markdown_table(header, rows), ""]
    complete = all(None not in pair for pair in pairs.values())
    if complete:
        spread = {f: max(abs(a - b) for (_, end), (a, b) in pairs.items() if end == f) for f in ends}
        best = {f: min(CRITERIA, key=lambda c, f=f: pairs[c, f][1]) for f in ends}
    verdict = {
        "claim": "the criteria's ranking at r0 = 64 is not an accident of one seed",
        "rule": "with seed 1, obs is again the lowest at 93.75 % removed",
        "evidence": (
            f"seed-to-seed difference of a criterion: up to {_fmt(spread[0.5])} at 50 %, up to "
            f"{_fmt(spread[0.9375])} at 93.75 %; lowest with seed 1: {best[0.5]} at 50 %, "
            f"{best[0.9375]} at 93.75 %"
        )
        if complete
        else "not finished",
        "verdict": _verdict(complete, complete and best[0.9375] == "obs"),
    }
    return lines, [verdict]


def seed_check(seed0: Sweep, seed1: Sweep, metric: str, points: dict[str, dict[str, Any]]) -> list[str]:
    """Some points of a study again with seed 1: both values side by side, and whether their order holds."""
    if not seed1.total:
        return []
    pairs = {name: [s.value(metric, **settings) for s in (seed0, seed1)] for name, settings in points.items()}
    rows = [[name, _fmt(a), _fmt(b)] for name, (a, b) in pairs.items()]
    lines = [f"Seed check ({seed1.done}):", "", *markdown_table(["setting", "seed 0", "seed 1"], rows), ""]
    if all(None not in pair for pair in pairs.values()):
        orders = [sorted(pairs, key=lambda name, i=i: pairs[name][i]) for i in (0, 1)]
        same = "the same" if orders[0] == orders[1] else "different"
        lines += [
            f"Order from lowest {metric}: seed 0 {' < '.join(orders[0])}; seed 1 {' < '.join(orders[1])} ({same}).",
            "",
        ]
    return lines


def best_setting_study(
    sweep: Sweep,
    metric: str,
    axis: str,
    values: Sequence[Any],
    paper: Any,
    claim: str,
    label: str,
) -> tuple[list[str], list[dict[str, Any]]]:
    """One axis: the metric per value, and whether the paper's value is the best one."""
    results = {v: sweep.value(metric, **{axis: v}) for v in values}
    finished = {v: m for v, m in results.items() if m is not None}
    best = min(finished, key=finished.get) if finished else None
    rows = [
        [f"{v:g}" + (" (paper)" if _same(v, paper) else ""), f"**{_fmt(m)}**" if v == best else _fmt(m)]
        for v, m in results.items()
    ]
    lines = [sweep.done, "", *markdown_table([label, metric], rows), ""]
    gap = (finished[paper] / finished[best] - 1) if best is not None and paper in finished else None
    verdict = {
        "claim": claim,
        "rule": f"{label} = {paper:g} gives the lowest {metric}",
        "evidence": (
            f"best {label} = {best:g} ({_fmt(finished[best])}); paper's {paper:g}: "
            f"{_fmt(finished.get(paper))}" + (f", {gap:+.1%} vs best" if gap is not None else "")
        )
        if best is not None
        else "not finished",
        "verdict": _verdict(len(finished) == len(values), best is not None and _same(best, paper)),
    }
    return lines, [verdict]


def schedule_study(sweep: Sweep) -> tuple[list[str], list[dict[str, Any]]]:
    """PrunedLoRA's K1 x K2 schedule: NLL (and the events actually run) per cell."""
    k1_values, k2_values = (1, 10, 50), (1, 2, 8)
    table, values = pivot(
        sweep,
        "test_nll",
        ("rank_pruning__prune_every", k1_values),
        ("rank_pruning__per_event", k2_values),
        column_label=lambda k: f"K2 = {k}",
        row_label="K1",
    )
    events = markdown_table(
        ["K1", *(f"K2 = {k}" for k in k2_values)],
        [
            [
                str(k1),
                *(
                    _fmt(sweep.value("pruning_events", rank_pruning__prune_every=k1, rank_pruning__per_event=k2), 0)
                    for k2 in k2_values
                ),
            ]
            for k1 in k1_values
        ],
    )
    lines = [
        sweep.done,
        "",
        "Test NLL (rows K1, columns K2; the lowest of each column in bold):",
        "",
        *table,
        "",
        "Pruning events run (the schedule raises K2 where the events that fit cannot reach the rank):",
        "",
        *events,
        "",
    ]
    cells = {(k1, k2): values[k1][k2] for k1 in k1_values for k2 in k2_values if values[k1][k2] is not None}
    ordered = sorted(cells, key=cells.get)
    place = ordered.index((10, 2)) + 1 if (10, 2) in cells else None
    verdict = {
        "claim": "PrunedLoRA's schedule K1 = 10, K2 = 2 (gradual pruning) is a good setting",
        "rule": "(10, 2) is among the best three of the nine cells",
        "evidence": f"(10, 2) places {place} of {len(cells)}; best {ordered[0]} ({_fmt(cells[ordered[0]])})"
        if place
        else "not finished",
        "verdict": _verdict(len(cells) == 9, place is not None and place <= 3),
    }
    return lines, [verdict]


def semi_structured_study(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """LoRAPrune N:M against Wanda and SparseGPT N:M, from the N:M benchmark's own verdicts."""
    if not path.exists():
        return ["not run"], []
    data = json.loads(path.read_text())
    rows = [
        [
            v["pattern"],
            v["against"],
            v["best_baseline"],
            _fmt(v["baseline_perplexity"]),
            _fmt(v["loraprune_perplexity"]),
            f"{v['ratio']:.2f}",
        ]
        for v in data["verdicts"]
    ]
    lines = [
        f"`{data['command']}` (details: `semi_structured.md`)",
        "",
        *markdown_table(["pattern", "baseline trained", "best baseline", "its ppl", "LoRAPrune ppl", "ratio"], rows),
        "",
    ]
    matched = [v["matches"] or v["better"] for v in data["verdicts"]]
    verdict = {
        "claim": "LoRAPrune's criterion applied to N:M sparsity matches dedicated semi-structured pruners",
        "rule": "LoRAPrune's perplexity at most 5 % above the best of Wanda / SparseGPT at the same pattern",
        "evidence": f"matched in {sum(matched)} of {len(matched)} comparisons",
        "verdict": _verdict(bool(matched), all(matched)),
    }
    return lines, [verdict]


def _verdict(finished: bool, holds: bool) -> str:
    if not finished:
        return "incomplete"
    return "supported" if holds else "contradicted"


def build(results: Path) -> tuple[dict[str, Any], list[str]]:
    """All studies: (the JSON summary, the markdown lines)."""
    sweep = lambda name: Sweep(results / f"sweep-{name}")  # noqa: E731
    studies = {
        "Rank-pruning criteria (PrunedLoRA)": rank_criteria_study(
            {64: sweep("rank-criteria-r64-cpu"), 256: sweep("rank-criteria-r256-cpu")}
        ),
        "Rank-pruning criteria: a second seed (r0 = 64)": seed_spread_study(
            sweep("rank-criteria-r64-cpu"), sweep("rank-criteria-r64-seed1-cpu")
        ),
        "Scaling alpha (PrunedLoRA, r0 = 64 pruned to rank 8)": best_setting_study(
            sweep("prunedlora-alpha-cpu"),
            "test_nll",
            "rank_pruning__alpha_over_r0",
            (0.25, 0.5, 1.0, 2.0),
            1.0,
            "alpha = r0 (scaling 1) is PrunedLoRA's best setting",
            "alpha / r0",
        ),
        "Schedule K1 x K2 (PrunedLoRA, r0 = 32 pruned to rank 8)": schedule_study(sweep("prunedlora-schedule-cpu")),
        "Score smoothing (LoRAPrune at 50 %)": best_setting_study(
            sweep("loraprune-ema-cpu"),
            "perplexity_after",
            "schedule__ema",
            (0.0, 0.5, 0.9, 0.99),
            0.9,
            "LoRAPrune's moving average of the scores with coefficient 0.9 is its best setting",
            "EMA",
        ),
        "Pruning interval (LoRAPrune at 50 %)": best_setting_study(
            sweep("loraprune-prune-every-cpu"),
            "perplexity_after",
            "schedule__prune_every",
            (1, 10, 50),
            10,
            "LoRAPrune's iterative pruning every 10 steps is its best setting",
            "prune_every",
        ),
        "N:M semi-structured sparsity (LoRAPrune)": semi_structured_study(results / "semi_structured.json"),
    }
    checks = {
        "Scaling alpha (PrunedLoRA, r0 = 64 pruned to rank 8)": seed_check(
            sweep("prunedlora-alpha-cpu"),
            sweep("prunedlora-alpha-seed1-cpu"),
            "test_nll",
            {f"alpha / r0 = {v:g}": {"rank_pruning__alpha_over_r0": v} for v in (1.0, 2.0)},
        ),
        "Schedule K1 x K2 (PrunedLoRA, r0 = 32 pruned to rank 8)": seed_check(
            sweep("prunedlora-schedule-cpu"),
            sweep("prunedlora-schedule-seed1-cpu"),
            "test_nll",
            {f"K1 = {k}, K2 = 2": {"rank_pruning__prune_every": k, "rank_pruning__per_event": 2} for k in (1, 10, 50)},
        ),
        "Score smoothing (LoRAPrune at 50 %)": seed_check(
            sweep("loraprune-ema-cpu"),
            sweep("loraprune-ema-seed1-cpu"),
            "perplexity_after",
            {f"EMA {v:g}": {"schedule__ema": v} for v in (0.5, 0.9)},
        ),
    }
    lines = [
        "# The papers' claims, checked on SmolLM2-135M",
        "",
        "Written by `python benchmarks/studies.py` from the sweeps in this folder (each sweep's own "
        "`sweep.md` lists every setting). All runs are at reduced CPU settings (see each command's spec); "
        "a verdict holds for this model at these settings only.",
        "",
    ]
    summary = {}
    for title, (table, verdicts) in studies.items():
        lines += [f"## {title}", "", *table, *checks.get(title, [])]
        for v in verdicts:
            lines += [f"- **{v['verdict']}**: {v['claim']}. Rule: {v['rule']}. {v['evidence']}."]
        lines.append("")
        summary[title] = verdicts
    return summary, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder with the sweep-* results and semi_structured.json; studies.* are written here",
    )
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"no results folder {args.results} (run from the repository root, or pass --results)")
    summary, lines = build(args.results)
    write_json(args.results / "studies.json", summary)
    (args.results / "studies.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
