"""benchmarks/studies.py: the verdicts follow from the sweep numbers by their stated rules."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("studies", REPO_ROOT / "benchmarks" / "studies.py")
studies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(studies)


def write_sweep(results: Path, name: str, points: list[tuple[dict, dict]], pending: int = 0) -> None:
    entries = [{"settings": s, "metrics": m, "status": "ok"} for s, m in points]
    entries += [{"settings": {}, "metrics": {}, "status": "pending"}] * pending
    folder = results / f"sweep-{name}"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"command": f"loraprune sweep {name}", "points": entries}))


def criteria_points(nll) -> list[tuple[dict, dict]]:
    return [
        ({"rank_pruning.criterion": c, "rank_pruning.removed_fraction": f}, {"test_nll": nll(c, f)})
        for c in studies.CRITERIA
        for f in (0.5, 0.75, 0.875, 0.9375)
    ]


def by_claim(summary: dict, title_start: str) -> list[dict]:
    return next(v for title, v in summary.items() if title.startswith(title_start))


def test_criteria_verdicts_follow_the_numbers(tmp_path):
    # obs best everywhere; the activation-based criteria degrade faster with the removed fraction
    slope = {"obs": 1.0, "taylor": 1.2, "magnitude": 1.5, "wanda": 2.0, "sparsegpt": 2.5}
    offset = {"obs": 0.0, "taylor": 0.1, "magnitude": 0.2, "wanda": 0.05, "sparsegpt": 0.05}
    for r0 in (64, 256):
        write_sweep(tmp_path, f"rank-criteria-r{r0}-cpu", criteria_points(lambda c, f: 1 + offset[c] + slope[c] * f))
    summary, lines = studies.build(tmp_path)
    best, robust = by_claim(summary, "Rank-pruning criteria")
    assert best["verdict"] == "supported" and "obs lowest in 8 of 8 columns" in best["evidence"]
    assert robust["verdict"] == "supported" and "r0 64: obs 1.9375 vs sparsegpt" in robust["evidence"]
    assert "| obs | **1.5000** |" in "\n".join(lines)

    # taylor best at every fraction, wanda the most robust: both claims fail
    slope = {"obs": 1.0, "taylor": 1.0, "magnitude": 1.0, "wanda": 0.1, "sparsegpt": 1.0}
    offset = {"obs": 0.1, "taylor": 0.0, "magnitude": 0.2, "wanda": 1.0, "sparsegpt": 0.3}
    other = tmp_path / "other"
    for r0 in (64, 256):
        write_sweep(other, f"rank-criteria-r{r0}-cpu", criteria_points(lambda c, f: 1 + offset[c] + slope[c] * f))
    best, robust = by_claim(studies.build(other)[0], "Rank-pruning criteria")
    assert best["verdict"] == "contradicted" and "obs lowest in 0 of 8" in best["evidence"]
    assert robust["verdict"] == "contradicted"

    # one column short: no verdict yet, but the evidence so far is shown
    partial = tmp_path / "partial"
    write_sweep(partial, "rank-criteria-r64-cpu", criteria_points(lambda c, f: 1 + offset[c] + slope[c] * f)[:-1])
    write_sweep(partial, "rank-criteria-r256-cpu", criteria_points(lambda c, f: 1 + offset[c] + slope[c] * f))
    best, robust = by_claim(studies.build(partial)[0], "Rank-pruning criteria")
    assert best["verdict"] == "incomplete" and "obs lowest in 0 of 7" in best["evidence"]
    assert robust["verdict"] == "incomplete"


def test_a_best_setting_is_incomplete_until_every_value_ran_and_names_the_best(tmp_path):
    ema = [({"schedule.ema": e}, {"perplexity_after": p}) for e, p in ((0.0, 90.0), (0.5, 80.0), (0.9, 85.0))]
    write_sweep(tmp_path, "loraprune-ema-cpu", ema, pending=1)
    (verdict,) = by_claim(studies.build(tmp_path)[0], "Score smoothing")
    assert verdict["verdict"] == "incomplete"
    assert "best EMA = 0.5 (80.0000); paper's 0.9: 85.0000, +6.2% vs best" in verdict["evidence"]

    done = tmp_path / "done"
    write_sweep(done, "loraprune-ema-cpu", [*ema, ({"schedule.ema": 0.99}, {"perplexity_after": 70.0})])
    (verdict,) = by_claim(studies.build(done)[0], "Score smoothing")
    assert verdict["verdict"] == "contradicted" and "best EMA = 0.99" in verdict["evidence"]


def test_schedule_verdict_places_the_papers_cell(tmp_path):
    cells = [
        (
            {"rank_pruning.prune_every": k1, "rank_pruning.per_event": k2},
            {"test_nll": 1 + abs(k1 - 10) / 100 + abs(k2 - 2) / 10, "pruning_events": 3},
        )
        for k1 in (1, 10, 50)
        for k2 in (1, 2, 8)
    ]
    write_sweep(tmp_path, "prunedlora-schedule-cpu", cells)
    summary, lines = studies.build(tmp_path)
    (verdict,) = by_claim(summary, "Schedule")
    assert verdict["verdict"] == "supported" and verdict["evidence"].startswith("(10, 2) places 1 of 9")
    table = "\n".join(lines)  # the lowest of each column in bold
    assert "| 1 | 1.1900 | 1.0900 | 1.6900 |" in table and "| 10 | **1.1000** | **1.0000** | **1.6000** |" in table


def test_seed_spread_reports_the_largest_difference_and_checks_the_winner(tmp_path):
    def nll(c, f, shift=0.0):
        return 1 + f * (1 + studies.CRITERIA.index(c)) + shift

    write_sweep(tmp_path, "rank-criteria-r64-cpu", criteria_points(nll))
    second = [
        ({"rank_pruning.criterion": c, "rank_pruning.removed_fraction": f}, {"test_nll": nll(c, f, 0.01 * i)})
        for i, (c, f) in enumerate((c, f) for c in studies.CRITERIA for f in (0.5, 0.9375))
    ]
    write_sweep(tmp_path, "rank-criteria-r64-seed1-cpu", second)
    (verdict,) = by_claim(studies.build(tmp_path)[0], "Rank-pruning criteria: a second seed")
    # differences 0.00, 0.02, 0.04, 0.06, 0.08 at 50 %; 0.01 ... 0.09 at 93.75 %
    assert verdict["verdict"] == "supported"
    assert "up to 0.0800 at 50 %, up to 0.0900 at 93.75 %" in verdict["evidence"]

    flipped = tmp_path / "flipped"
    write_sweep(flipped, "rank-criteria-r64-cpu", criteria_points(nll))
    write_sweep(flipped, "rank-criteria-r64-seed1-cpu", [(s, {"test_nll": 3 - m["test_nll"]}) for s, m in second])
    (verdict,) = by_claim(studies.build(flipped)[0], "Rank-pruning criteria: a second seed")
    assert verdict["verdict"] == "contradicted" and "sparsegpt at 93.75 %" in verdict["evidence"]


def test_a_seed_check_sits_under_its_study_and_says_whether_the_order_held(tmp_path):
    write_sweep(
        tmp_path,
        "prunedlora-alpha-cpu",
        [({"rank_pruning.alpha_over_r0": a}, {"test_nll": 2 - a / 4}) for a in (0.25, 0.5, 1.0, 2.0)],
    )
    write_sweep(
        tmp_path,
        "prunedlora-alpha-seed1-cpu",
        [({"rank_pruning.alpha_over_r0": a}, {"test_nll": n}) for a, n in ((1.0, 1.5), (2.0, 1.6))],
    )
    text = "\n".join(studies.build(tmp_path)[1])
    section = text[text.index("## Scaling alpha") : text.index("## Schedule")]
    assert "| alpha / r0 = 1 | 1.7500 | 1.5000 |" in section and "| alpha / r0 = 2 | 1.5000 | 1.6000 |" in section
    assert "seed 0 alpha / r0 = 2 < alpha / r0 = 1; seed 1 alpha / r0 = 1 < alpha / r0 = 2 (different)" in section
    assert "Seed check" not in text[text.index("## Schedule") :]  # no replicate sweep, no section


def test_studies_refuses_a_missing_results_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        studies.main(["--results", str(tmp_path / "missing")])
    assert "no results folder" in capsys.readouterr().err
