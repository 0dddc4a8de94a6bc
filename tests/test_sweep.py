"""`loraprune sweep`: spec validation, grid expansion, resume after an interruption, failures, and real
tiny sweeps of both job kinds through the command line."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from loraprune.cli import main
from loraprune.errors import ConfigError
from loraprune.rank_pruning.config import CRITERIA
from loraprune.sweep import JOBS, RESULTS_FILE, TABLE_FILE, load_spec, parse_spec, run_sweep

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sweeps"

ADAPTER_SPEC = {
    "name": "fake",
    "job": "adapter",
    "metrics": ["test_nll", "total_rank"],
    "fixed": {"rank_pruning": {"rank": 2}, "training": {"steps": 3}},
    "grid": {
        "run.method": ["prunedlora", "lora"],
        "rank_pruning.r0": [8, 16],
        "rank_pruning.alpha_over_r0": [0.5, 1, 2],
    },
}


def spec_with(output: Path | None = None, **changes) -> dict:
    """A copy of ADAPTER_SPEC with top-level keys replaced (None removes a key)."""
    spec = copy.deepcopy(ADAPTER_SPEC)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    if output is not None:
        spec["output"] = str(output)
    return spec


class FakeJob:
    """A job runner that records the points it ran and returns metrics computed from their configs."""

    def __init__(self, interrupt_at: int | None = None, fail_method: str | None = None):
        self.calls: list[dict] = []
        self.interrupt_at = interrupt_at
        self.fail_method = fail_method

    def __call__(self, configs: dict, output: Path) -> dict:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(configs)
        if configs["run"].method == self.fail_method:
            raise RuntimeError(f"boom at r0={configs['rank_pruning'].r0}")
        pruning = configs["rank_pruning"]
        return {
            "test_nll": pruning.lora_alpha / pruning.r0 + (0.5 if configs["run"].method == "lora" else 0.0),
            "total_rank": pruning.rank * 14,
        }


def without_timing(results: dict) -> dict:
    """The results without what differs between two runs into two directories: wall times, the output."""
    results = copy.deepcopy(results)
    results["spec"].pop("output")
    for point in results["points"]:
        point.pop("seconds")
    return results


# ---------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "change,message",
    [
        ({"grdi": {}}, "unknown key 'grdi' (did you mean 'grid'?)"),
        ({"job": "adaptor"}, "'job' must be one of model, adapter"),
        ({"grid": {"rank_pruning.alpah": [1.0]}}, "unknown setting 'rank_pruning.alpah' (did you mean 'alpha'?)"),
        ({"grid": {"rank_pruning.r0": [8, "sixteen"]}}, "rank_pruning.r0: 'sixteen' is not a whole number"),
        ({"grid": {"rank_pruning.r0": [8.5]}}, "rank_pruning.r0: 8.5 is not a whole number"),
        (
            {"grid": {"rank_pruning.schedule": ["cubic"]}},
            "rank_pruning.schedule: 'cubic' is not one of per_module, global",
        ),
        ({"grid": {"rank_pruning.use_gradient": ["yes"]}}, "'yes' is not true or false"),
        ({"grid": {"trainig.steps": [1]}}, "unknown section 'trainig' in 'trainig.steps' (did you mean 'training'?)"),
        ({"grid": {"rank_pruning.r0": 8}}, "needs a non-empty list of values"),
        ({"grid": {"rank_pruning.r0": [8, 8]}}, "repeats a value"),
        ({"grid": {"rank_pruning.r0": [2, 8]}}, "grid point rank_pruning.r0=2: the final rank must be in [1, r0=2)"),
        ({"grid": {"run.output": ["x"]}}, "run.output is set by the sweep"),
        ({"grid": {"training.steps": [1, 2]}}, "training.steps: both fixed and a grid axis"),
        ({"metrics": ["test_nl"]}, "unknown metric 'test_nl' (did you mean 'test_nll'?)"),
        ({"fixed": {"training": 3}}, "give it as training: {field: value}"),
        (
            {"fixed": {}, "grid": {"rank_pruning.removed_fraction": [0.3]}},
            "removed_fraction 0.3 of r0=64 leaves 44.8 components",
        ),
        (
            {"fixed": {"rank_pruning.alpha": 8.0}, "grid": {"rank_pruning.alpha_over_r0": [1]}},
            "set either rank_pruning.alpha or rank_pruning.alpha_over_r0, not both",
        ),
        (
            {
                "job": "model",
                "fixed": {"run": {"eval_data": "wikitext2"}},
                "grid": {"run.method": ["magnitude", "l1"]},
                "metrics": None,
            },
            "run.method 'l1' is not one of loraprune, taylor",
        ),
        (
            {"job": "model", "fixed": {}, "grid": {"run.sparsity": [0.2, 0.4]}, "metrics": None},
            "metric perplexity_after needs run.eval_data",
        ),
    ],
)
def test_spec_errors_name_the_key_and_the_value(change, message):
    with pytest.raises(ConfigError) as error:
        parse_spec(spec_with(**change))
    assert message in str(error.value)


def test_settings_are_converted_to_the_field_types():
    spec = parse_spec(
        spec_with(
            fixed={"training.learning_rate": "1e-3", "rank_pruning": {"alpha": 16, "rank": 2}},
            grid={"rank_pruning.target_modules": [["q_proj"], ["q_proj", "v_proj"]]},
        )
    )
    training, pruning = spec.points[0].configs["training"], spec.points[0].configs["rank_pruning"]
    assert training.learning_rate == 0.001  # PyYAML reads 1e-3 as a string
    assert isinstance(pruning.alpha, float) and pruning.alpha == 16.0
    assert [p.configs["rank_pruning"].target_modules for p in spec.points] == [("q_proj",), ("q_proj", "v_proj")]


def test_grid_is_the_cartesian_product_in_order_with_derived_settings():
    spec = parse_spec(ADAPTER_SPEC)
    assert len(spec.points) == 2 * 2 * 3
    assert [p.index for p in spec.points] == list(range(12))
    assert spec.points[1].settings == {
        "run.method": "prunedlora",
        "rank_pruning.r0": 8,
        "rank_pruning.alpha_over_r0": 1.0,
    }  # the last axis varies fastest
    resolved = [
        (p.configs["run"].method, p.configs["rank_pruning"].r0, p.configs["rank_pruning"].alpha) for p in spec.points
    ]
    assert resolved == [(m, r0, ratio * r0) for m in ("prunedlora", "lora") for r0 in (8, 16) for ratio in (0.5, 1, 2)]
    assert len({p.id for p in spec.points}) == 12
    fractions = parse_spec(
        spec_with(
            fixed={}, grid={"rank_pruning.r0": [64, 256], "rank_pruning.removed_fraction": [0.5, 0.75, 0.875, 0.9375]}
        )
    )
    assert [p.configs["rank_pruning"].rank for p in fractions.points] == [32, 16, 8, 4, 128, 64, 32, 16]


def test_point_ids_depend_on_the_settings_only():
    ids = {
        p.configs["rank_pruning"].alpha: p.id
        for p in parse_spec(ADAPTER_SPEC).points
        if p.configs["run"].method == "lora" and p.configs["rank_pruning"].r0 == 8
    }
    # the same points given in another axis order and with 1 written as 1.0: the same ids
    reordered = spec_with(
        grid={"rank_pruning.alpha_over_r0": [2.0, 1.0, 0.5], "rank_pruning.r0": [8], "run.method": ["lora"]}
    )
    assert {p.configs["rank_pruning"].alpha: p.id for p in parse_spec(reordered).points} == ids
    # a changed fixed setting: other ids
    changed = spec_with(fixed={"rank_pruning": {"rank": 2}, "training": {"steps": 4}})
    assert not {p.id for p in parse_spec(changed).points} & set(ids.values())


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    spec = load_spec(path)
    expected = {
        "rank_criteria.yaml": 40,
        "prunedlora_alpha.yaml": 4,
        "prunedlora_schedule.yaml": 9,
        "loraprune_ema.yaml": 4,
        "loraprune_prune_every.yaml": 3,
        "rank_criteria_quick.yaml": 5,
        "rank_criteria_r64_cpu.yaml": 20,
        "rank_criteria_r256_cpu.yaml": 20,
        "prunedlora_alpha_cpu.yaml": 4,
        "prunedlora_schedule_cpu.yaml": 9,
        "loraprune_ema_cpu.yaml": 4,
        "loraprune_prune_every_cpu.yaml": 3,
        "rank_criteria_r64_seed1_cpu.yaml": 10,
        "prunedlora_alpha_seed1_cpu.yaml": 2,
        "prunedlora_schedule_seed1_cpu.yaml": 3,
        "loraprune_ema_seed1_cpu.yaml": 2,
        "prunedlora_gap_baselines_cpu.yaml": 1,
        "prunedlora_gap_score_cpu.yaml": 4,
        "prunedlora_gap_schedule_cpu.yaml": 2,
        "prunedlora_gap_side_cpu.yaml": 2,
        "prunedlora_gap_lr_cpu.yaml": 1,
        "prunedlora_gap_lr_baselines_cpu.yaml": 2,
        "prunedlora_gap_lr_seed1_cpu.yaml": 2,
        "prunedlora_gap_late_cpu.yaml": 2,
        "prunedlora_gap_basis_cpu.yaml": 2,
        "prunedlora_gap_combined_cpu.yaml": 2,
        "prunedlora_calibration_cpu.yaml": 2,
        "prunedlora_r128_timing_seed1.yaml": 3,
        "prunedlora_r128_cooldown_seed1.yaml": 2,
        "prunedlora_r128_cooldown_seed0.yaml": 2,
        "prunedlora_r128_late_seed1.yaml": 2,
        "prunedlora_r128_removal_seed1.yaml": 1,
        "prunedlora_r128_basis_seed1.yaml": 2,
        "prunedlora_r128_basis_seed0.yaml": 1,
        "prunedlora_r128_lora_baselines.yaml": 2,
    }
    assert len(spec.points) == expected[path.name]
    # full studies write under sweeps/; the CPU-sized ones are committed with the benchmark results
    assert str(spec.output) in (f"sweeps/{spec.name}", f"benchmarks/results/sweep-{spec.name}")
    if path.name.startswith("rank_criteria"):  # every criterion RankPruningConfig takes
        assert {point.configs["rank_pruning"].criterion for point in spec.points} == set(CRITERIA)


# ---------------------------------------------------------------------------- running and resuming


def test_an_interrupted_sweep_resumes_with_the_remaining_points(tmp_path):
    spec = parse_spec(spec_with(tmp_path / "resumed"))
    interrupted = FakeJob(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, job=interrupted, progress=False)
    stored = json.loads((spec.output / RESULTS_FILE).read_text())
    assert [p["status"] for p in stored["points"]] == ["ok"] * 5 + ["pending"] * 7
    assert "5 of 12 points done, 7 not run yet" in (spec.output / TABLE_FILE).read_text()

    rest = FakeJob()
    outcome = run_sweep(parse_spec(spec_with(tmp_path / "resumed")), job=rest, progress=False)
    assert [(c["run"].method, c["rank_pruning"].r0, c["rank_pruning"].alpha) for c in rest.calls] == [
        (p.configs["run"].method, p.configs["rank_pruning"].r0, p.configs["rank_pruning"].alpha)
        for p in spec.points[5:]
    ]
    assert outcome.reused == [p.id for p in spec.points[:5]] and outcome.ran == [p.id for p in spec.points[5:]]

    straight = run_sweep(parse_spec(spec_with(tmp_path / "straight")), job=FakeJob(), progress=False)
    resumed = json.loads((spec.output / RESULTS_FILE).read_text())
    assert without_timing(resumed) == without_timing(json.loads((tmp_path / "straight" / RESULTS_FILE).read_text()))
    assert without_timing(resumed) == without_timing(straight.results)
    assert resumed["summary"] == {"points": 12, "ok": 12, "failed": 0, "pending": 0}
    # plots: one per numeric axis, none for the categorical method
    assert sorted(p.name for p in spec.output.glob("*.png")) == [
        "vs_rank_pruning_alpha_over_r0.png",
        "vs_rank_pruning_r0.png",
    ]


def test_a_failed_point_is_recorded_the_sweep_goes_on_and_a_rerun_retries_it(tmp_path):
    spec = parse_spec(spec_with(tmp_path / "out"))
    outcome = run_sweep(spec, job=FakeJob(fail_method="lora"), progress=False)
    assert len(outcome.ran) == 12 and len(outcome.failed) == 6
    points = outcome.results["points"]
    assert [p["status"] for p in points] == ["ok"] * 6 + ["failed"] * 6
    assert points[6]["error"] == "RuntimeError: boom at r0=8" and points[6]["metrics"] is None
    assert "failed: RuntimeError: boom at r0=8" in (spec.output / TABLE_FILE).read_text()
    retry = FakeJob()
    outcome = run_sweep(spec, job=retry, progress=False)
    assert outcome.ran == [p["id"] for p in points[6:]] and not outcome.failed
    assert {c["run"].method for c in retry.calls} == {"lora"}


def test_a_changed_setting_is_refused_an_extended_grid_reuses_and_fresh_reruns(tmp_path):
    run_sweep(parse_spec(spec_with(tmp_path / "out")), job=FakeJob(), progress=False)
    changed = spec_with(tmp_path / "out", fixed={"rank_pruning": {"rank": 2}, "training": {"steps": 5}})
    with pytest.raises(
        ConfigError,
        match=r"holds 12 finished point\(s\) this spec no longer has \(changed: "
        r"training.steps: 3 -> 5\)",
    ):
        run_sweep(parse_spec(changed), job=FakeJob(), progress=False)
    narrowed = spec_with(tmp_path / "out", grid={**ADAPTER_SPEC["grid"], "rank_pruning.r0": [8]})
    with pytest.raises(ConfigError, match=r"grid rank_pruning.r0: \[16\] removed"):
        run_sweep(parse_spec(narrowed), job=FakeJob(), progress=False)

    extended = spec_with(tmp_path / "out", grid={**ADAPTER_SPEC["grid"], "rank_pruning.r0": [8, 16, 32]})
    job = FakeJob()
    outcome = run_sweep(parse_spec(extended), job=job, progress=False)
    assert len(outcome.reused) == 12 and len(outcome.ran) == 6
    assert {c["rank_pruning"].r0 for c in job.calls} == {32}

    job = FakeJob()
    outcome = run_sweep(parse_spec(changed), job=job, fresh=True, progress=False)
    assert len(job.calls) == 12 and not outcome.reused
    assert {p["config"]["training"]["steps"] for p in outcome.results["points"]} == {5}


def test_cli_failure_exit_status_interrupt_and_dry_run(tmp_path, monkeypatch, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_with(tmp_path / "out"), sort_keys=False))
    job = FakeJob(interrupt_at=3)
    monkeypatch.setitem(JOBS, "adapter", dataclasses.replace(JOBS["adapter"], run=job))
    assert main(["sweep", str(path), "--no-progress"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert listed.count(" done ") == 3 and listed.count(" to run ") == 9 and "12 points, 9 to run" in listed

    job.interrupt_at, job.fail_method = None, "lora"
    assert main(["sweep", str(path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "ran 9 point(s), reused 3; 6 of 12 done" in captured.out
    assert "6 point(s) failed" in captured.err
    table = (tmp_path / "out" / TABLE_FILE).read_text()
    assert f"Reproduce: `loraprune sweep {path} --output {tmp_path / 'out'}`" in table


# ---------------------------------------------------------------------------- real tiny sweeps


def test_model_sweep_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, one_thread):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    path = tmp_path / "model.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "job": "model",
                "metrics": ["perplexity_after", "sparsity_decoder"],
                "fixed": {
                    "run": {
                        "model": str(tiny_model_dir),
                        "method": "magnitude",
                        "eval_data": str(text),
                        "eval_seq_len": 16,
                    }
                },
                "grid": {"run.sparsity": [0.25, 0.5]},
            }
        )
    )
    output = tmp_path / "out"
    assert main(["sweep", str(path), "--output", str(output), "--no-progress"]) == 0
    results = json.loads((output / RESULTS_FILE).read_text())
    points = results["points"]
    assert [p["status"] for p in points] == ["ok", "ok"]
    assert [p["metrics"]["sparsity_decoder"] for p in points] == pytest.approx([0.25, 0.5], abs=0.01)
    assert all(p["metrics"]["perplexity_after"] > 1 for p in points)
    table = (output / TABLE_FILE).read_text()
    for point in points:
        assert f"{point['metrics']['perplexity_after']:.5g}" in table and point["id"] in table
    assert (output / "vs_run_sparsity.png").stat().st_size > 0
    assert not list(output.glob(".point-*"))  # the pruned models were scratch


def test_adapter_sweep_end_to_end_on_a_tiny_model(tiny_model_dir, data_dir, tmp_path, one_thread):
    path = tmp_path / "adapter.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "job": "adapter",
                "metrics": ["test_nll", "total_rank"],
                "keep_outputs": True,
                "fixed": {
                    "run": {
                        "model": str(tiny_model_dir),
                        "data": str(data_dir / "gsm8k" / "train.jsonl"),
                        "train_limit": 8,
                        "max_answer_tokens": 24,
                    },
                    "rank_pruning": {"r0": 8, "prune_every": 2},
                    "training": {"steps": 6, "batch_size": 2, "logging_steps": 100},
                    "eval": {"data": str(data_dir / "gsm8k" / "test.jsonl"), "problems": 4, "max_answer_tokens": 24},
                },
                "grid": {"rank_pruning.removed_fraction": [0.5, 0.75]},
            }
        )
    )
    output = tmp_path / "out"
    assert main(["sweep", str(path), "--output", str(output), "--no-progress"]) == 0
    points = json.loads((output / RESULTS_FILE).read_text())["points"]
    assert [p["metrics"]["total_rank"] for p in points] == [4 * 14, 2 * 14]  # 2 layers x 7 modules
    assert [p["config"]["rank_pruning"]["rank"] for p in points] == [4, 2]
    assert all(0 < p["metrics"]["test_nll"] < 10 and p["metrics"]["test_tokens"] > 0 for p in points)
    for point in points:  # keep_outputs: the evaluated adapters stay, at their final ranks
        ranks = json.loads((output / "points" / point["id"] / "pruned_ranks.json").read_text())["ranks"]
        assert sum(ranks.values()) == point["metrics"]["total_rank"]
    table = (output / TABLE_FILE).read_text()
    assert "rank_pruning.rank (derived)" in table and f"{points[1]['metrics']['test_nll']:.5g}" in table
    assert (output / "vs_rank_pruning_removed_fraction.png").stat().st_size > 0


def test_scratch_outputs_live_in_a_git_ignored_folder_and_are_removed(tmp_path):
    import subprocess

    from loraprune.sweep.runner import SCRATCH_DIR

    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    seen: list[Path] = []

    class WritingJob(FakeJob):
        def __call__(self, configs: dict, output: Path) -> dict:
            output.mkdir(parents=True)
            (output / "adapter_model.safetensors").write_bytes(b"weights")
            seen.append(output)
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=all"],
                cwd=repo,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "safetensors" not in status and SCRATCH_DIR not in status  # what `git add` would take
            return super().__call__(configs, output)

    spec = parse_spec(spec_with(repo / "results"))
    run_sweep(spec, job=WritingJob(), progress=False)
    assert len(seen) == 12 and all((repo / "results" / SCRATCH_DIR) in p.parents for p in seen)
    assert not any(p.exists() for p in seen)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    assert sorted(line.split()[-1] for line in status.splitlines()) == ["results/sweep.json", "results/sweep.md"] + [
        f"results/{p.name}" for p in sorted((repo / "results").glob("*.png"))
    ]
