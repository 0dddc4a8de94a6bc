"""Run reports: prune-model and prune-adapter write report.md, report.html and plots; `loraprune report` redraws."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from loraprune.api import prune_model
from loraprune.cli import main
from loraprune.config import PruneModelConfig
from loraprune.errors import ConfigError
from loraprune.run_report import contents, write_run_report
from loraprune.run_report.record import load_record
from loraprune.training import TrainingConfig, training_arguments


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Question: how many apples are there? " * 40)
    return path


def _prune_model(model_dir: Path, text: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "prune-model",
            "--model",
            str(model_dir),
            "--output",
            str(out),
            "--calibration-data",
            str(text),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--sparsity",
            "0.25",
            *extra,
        ]
    )


def _figures(record: dict) -> dict:
    figures: dict = {}
    builder = contents.model_report if record["command"] == "prune-model" else contents.adapter_report
    builder(record, figures)
    return figures


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def _assert_self_contained(html: str, images: int) -> None:
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == images
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in html and "<script" not in html and "<link" not in html


def test_loraprune_run_writes_its_report_and_the_cli_redraws_it(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert (
        _prune_model(
            tiny_model_dir,
            text_file,
            out,
            "--method",
            "loraprune",
            "--steps",
            "8",
            "--prune-every",
            "2",
            "--cooldown",
            "0.1",
            "--eval-data",
            str(text_file),
            "--eval-seq-len",
            "16",
        )
        == 0
    )
    record = json.loads((out / "loraprune_report.json").read_text())
    training = record["training"]
    assert [e["step"] for e in training["loss_history"]] == list(range(1, 9))  # logged every step (8 // 10 -> 1)
    assert training["loraprune"]["schedule"] == {"total_steps": 8, "warmup_steps": 0, "cooldown_steps": 0}
    assert [row["channels"] for row in record["layers_before"]] == [96, 96]

    for name in ("report.md", "report.html", contents.WIDTHS_PNG, contents.BUDGET_PNG, contents.LOSS_PNG):
        assert (out / name).is_file(), name
    for name in (contents.WIDTHS_PNG, contents.BUDGET_PNG, contents.LOSS_PNG):
        _assert_png(out / name)
    assert not (out / contents.RANKS_PNG).exists()

    markdown = (out / "report.md").read_text()
    assert f"| parameters (all) | {record['params_before']:,} | {record['params_after']:,} |" in markdown
    assert "| method | loraprune |" in markdown and "| sparsity | 0.25 |" in markdown
    assert "| prune-every | 2 |" in markdown  # the LoRAPrune schedule settings
    before, after = record["perplexity_before"]["perplexity"], record["perplexity_after"]["perplexity"]
    assert f"| {before:.3f} | {after:.3f} |" in markdown
    assert f"![kept heads, KV groups and channels per layer]({contents.WIDTHS_PNG})" in markdown
    _assert_self_contained((out / "report.html").read_text(), images=3)

    figures = _figures(record)
    widths = figures[contents.WIDTHS_PNG].axes
    for axis, key in zip(widths, ("heads", "kv_heads", "channels")):
        removed, kept = axis.containers  # one bar per layer each: the original width, and the kept one on top
        assert [bar.get_height() for bar in kept] == [row[key] for row in record["layers"]]
        assert [bar.get_height() for bar in removed] == [row[key] for row in record["layers_before"]]
    budget = figures[contents.BUDGET_PNG].axes[0]
    markers = budget.lines[-1]
    events = training["loraprune"]["events"]
    assert list(markers.get_xdata()) == [e["step"] for e in events] == [2, 4, 6, 8]
    assert markers.get_ydata()[-1] == pytest.approx(100 * record["sparsity_decoder"])
    lines = {line.get_label(): line for line in figures[contents.LOSS_PNG].axes[0].lines}
    assert list(lines["training loss"].get_ydata()) == [e["loss"] for e in training["loss_history"]]
    assert list(lines["pruning event"].get_xdata()) == [2, 2]  # the first of the vertical lines at the events

    for name in ("report.md", "report.html", contents.WIDTHS_PNG, contents.BUDGET_PNG, contents.LOSS_PNG):
        (out / name).unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    assert (out / "report.md").read_text() == markdown
    for name in (contents.WIDTHS_PNG, contents.BUDGET_PNG, contents.LOSS_PNG):
        _assert_png(out / name)


def test_one_shot_run_without_training_says_so(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "magnitude"
    assert _prune_model(tiny_model_dir, text_file, out, "--method", "magnitude") == 0
    markdown = (out / "report.md").read_text()
    assert "No LoRA training in this run (`--steps 0`)" in markdown
    assert "Perplexity was not evaluated" in markdown
    assert (out / contents.WIDTHS_PNG).is_file()
    assert not (out / contents.LOSS_PNG).exists() and not (out / contents.BUDGET_PNG).exists()
    _assert_self_contained((out / "report.html").read_text(), images=1)


def test_a_failing_report_leaves_no_output(tiny_model_dir, text_file, tmp_path, monkeypatch):
    def broken(directory: Path) -> list[Path]:
        raise RuntimeError("report failed")

    monkeypatch.setattr("loraprune.model_pruning.entry.write_run_report", broken)
    config = PruneModelConfig(output=str(tmp_path / "out"), model=str(tiny_model_dir), method="magnitude")
    with pytest.raises(RuntimeError, match="report failed"):
        prune_model(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tiny-llama"]


def test_prune_adapter_writes_its_report_with_the_rank_heatmap(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "adapter"
    assert (
        main(
            [
                "prune-adapter",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data_dir / "gsm8k" / "train.jsonl"),
                "--train-limit",
                "8",
                "--max-answer-tokens",
                "24",
                "--r0",
                "8",
                "--rank",
                "2",
                "--steps",
                "12",
                "--batch-size",
                "2",
                "--prune-every",
                "2",
                "--schedule",
                "global",
                "--logging-steps",
                "1",
                "--calibration-modules",
                "2",
                "--preset",  # the obs criterion, whose predictions the calibration plot checks
                "paper",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    record = load_record(out)
    assert record["command"] == "prune-adapter"
    events = record["pruning_events"]
    assert all(e["measured_loss_change"] is not None and len(e["module_checks"]) <= 2 for e in events)
    assert record["calibration"]["events"] == len(events)
    assert record["calibration"]["module_checks"] == sum(len(e["module_checks"]) for e in events) > 0
    ranks_file = json.loads((out / "pruned_ranks.json").read_text())
    assert {n: r for n, r in record["final_ranks"].items() if r} == ranks_file["ranks"]
    assert record["total_rank_before"] == 14 * 8 and record["total_rank_after"] == 28
    assert record["pruning_events"][-1]["total_rank"] == 28 == record["planned_total_rank"][-1][1]
    assert record["adapter_params_after"] < record["adapter_params_before"]
    assert record["file_size_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert len(record["training"]["loss_history"]) == 12

    for name in (contents.RANKS_PNG, contents.BUDGET_PNG, contents.LOSS_PNG, contents.CALIBRATION_PNG):
        _assert_png(out / name)
    assert not (out / contents.WIDTHS_PNG).exists()
    markdown = (out / "report.md").read_text()
    assert (
        f"| adapter parameters | {record['adapter_params_before']:,} | {record['adapter_params_after']:,} |" in markdown
    )
    assert "| r0 | 8 |" in markdown and "| schedule | global |" in markdown
    assert "Perplexity was not evaluated" in markdown
    assert "Calibration of the pruning score" in markdown and "| single modules |" in markdown
    _assert_self_contained((out / "report.html").read_text(), images=4)
    whole, modules = _figures(record)[contents.CALIBRATION_PNG].axes
    dots = {line.get_label(): line for line in whole.get_lines()}
    assert list(dots["pruning event"].get_xdata()) == [e["predicted_loss_change"] for e in events]
    assert list(dots["pruning event"].get_ydata()) == [e["measured_loss_change"] for e in events]
    dots = {line.get_label(): line for line in modules.get_lines()}
    assert list(dots["one module's removal"].get_ydata()) == [c["measured"] for e in events for c in e["module_checks"]]

    heatmap = _figures(record)[contents.RANKS_PNG].axes[0]
    grid = heatmap.images[0].get_array()
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = [[-1] * 7 for _ in range(2)]
    for name, rank in record["final_ranks"].items():  # model.layers.<i>.<block>.<module>
        parts = name.split(".")
        expected[int(parts[2])][modules.index(parts[-1])] = rank
    assert grid.tolist() == expected
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["q", "k", "v", "o", "gate", "up", "down"]

    (out / "report.md").unlink()
    write_run_report(out)
    assert (out / "report.md").read_text() == markdown


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "has no loraprune_report.json"),
        ("no-record", "has no loraprune_report.json"),
        ("not-json", "is not valid JSON"),
        ("other-command", "not the record of a prune-model or prune-adapter run"),
    ],
)
def test_report_command_refuses_a_directory_without_a_record(tmp_path, capsys, setup, message):
    directory = tmp_path / "run"
    if setup != "missing":
        directory.mkdir()
    if setup == "not-json":
        (directory / "loraprune_report.json").write_text("{not json")
    if setup == "other-command":
        (directory / "loraprune_report.json").write_text(json.dumps({"method": "wanda", "nm": {}}))
    assert main(["report", str(directory)]) == 2
    assert message in capsys.readouterr().err
    assert not (directory / "report.md").exists()


def test_report_to_is_a_list_of_trackers_and_tensorboard_needs_a_directory(tiny_model_dir, text_file, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--logging-dir"):
        TrainingConfig(report_to="tensorboard")
    assert training_arguments(TrainingConfig(report_to="none"), str(tmp_path)).report_to == []
    # prune-model hands --report-to to the LoRA training and checks it before pruning
    assert (
        _prune_model(
            tiny_model_dir,
            text_file,
            tmp_path / "o",
            "--method",
            "loraprune",
            "--steps",
            "4",
            "--report-to",
            "tensorboard",
        )
        == 2
    )
    assert "--logging-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
