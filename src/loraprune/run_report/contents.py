"""What a run report says: the blocks and figures of the `prune-model` and `prune-adapter` reports.

Everything is read from the run record (`loraprune_report.json`), so a report can be drawn
again from the output directory alone. Nothing here names the directory, so regenerating a
report gives the same text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraprune.run_report import plots
from loraprune.run_report.document import Block, Heading, Image, Paragraph, Table

WIDTHS_PNG = "report_kept_widths.png"
BUDGET_PNG = "report_budget.png"
LOSS_PNG = "report_loss.png"
RANKS_PNG = "report_ranks.png"
CALIBRATION_PNG = "report_calibration.png"
#: every figure a report may draw (those a run does not need are removed on regeneration)
FIGURES = (WIDTHS_PNG, BUDGET_PNG, LOSS_PNG, RANKS_PNG, CALIBRATION_PNG)

REGENERATE = "Written by loraprune with the run; `loraprune report DIR` draws it again from `loraprune_report.json`."


# ---- formatting --------------------------------------------------------------------------------


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _size(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "—"
    return f"{100 * (after / before - 1):+.2f}%"


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "—"
    return "—" if value is None else str(value)


def _settings_table(settings: Mapping[str, Any]) -> Table:
    return Table(("option", "value"), tuple((name.replace("_", "-"), _value(v)) for name, v in settings.items()))


def _size_row(label: str, params_before: int, params_after: int, file_bytes: int | None) -> tuple[str, ...]:
    """Size of the weights: measured after (the files written), estimated before (same bytes per parameter)."""
    if not file_bytes:
        return (label, "—", "—", "—")
    estimate = params_before * file_bytes / params_after
    return (label, f"≈ {_size(estimate)} (estimated)", _size(file_bytes), _change(estimate, file_bytes))


def _environment(record: Mapping[str, Any]) -> Paragraph:
    env = dict(record.get("environment") or {})
    if record.get("device"):  # where the run ran (`--device auto` resolved; records before it have none)
        env = {"device": record["device"], **env}
    return Paragraph("Environment: " + ", ".join(f"{name} {value}" for name, value in env.items()) + ".")


def _loss_section(
    history: list[Mapping[str, float]] | None, steps: int, events: list[Mapping[str, Any]], figures: dict[str, Any]
) -> list[Block]:
    if not history:
        return [Paragraph(f"No training loss was logged ({steps} steps).")]
    figures[LOSS_PNG] = plots.loss_curve(history, [event["step"] for event in events])
    first, last = history[0], history[-1]
    return [
        Image(LOSS_PNG, "training loss against step"),
        Paragraph(
            f"Logged loss {first['loss']:.4f} at step {first['step']} → {last['loss']:.4f} at step "
            f"{last['step']} ({len(history)} logged points)."
        ),
    ]


# ---- prune-model ---------------------------------------------------------------------------------


def _perplexity_row(record: Mapping[str, Any]) -> tuple[str, ...] | None:
    before, after = record.get("perplexity_before"), record.get("perplexity_after")
    if before is None or after is None:
        return None
    label = (
        f"perplexity ({before['data']}, {before['split']}, seq_len {before['seq_len']}, {before['tokens']:,} tokens)"
    )
    return (
        label,
        f"{before['perplexity']:.3f}",
        f"{after['perplexity']:.3f}",
        _change(before["perplexity"], after["perplexity"]),
    )


def _layer_table(record: Mapping[str, Any]) -> Table:
    before = {row["layer"]: row for row in record.get("layers_before") or []}

    def cell(row: Mapping[str, int], key: str) -> str:
        return f"{row[key]} / {before[row['layer']][key]}" if row["layer"] in before else str(row[key])

    header = ("layer", "query heads", "KV groups", "MLP channels")
    if before:
        header = tuple(f"{name} (kept / original)" if name != "layer" else name for name in header)
    return Table(
        header,
        tuple(
            (str(row["layer"]), cell(row, "heads"), cell(row, "kv_heads"), cell(row, "channels"))
            for row in record["layers"]
        ),
    )


def _budget_section(record: Mapping[str, Any], figures: dict[str, Any]) -> list[Block]:
    training = record.get("training") or {}
    schedule = training.get("loraprune")
    if record["method"] != "loraprune":
        return [
            Paragraph(
                f"One-shot `{record['method']}`: every group was removed at once, before any training, "
                "so there is no schedule to plot."
            )
        ]
    if not schedule or "schedule" not in schedule:
        return [Paragraph("This record has no LoRAPrune schedule (written by an older loraprune).")]
    events = schedule["events"]
    figures[BUDGET_PNG] = plots.sparsity_against_step(events, schedule["schedule"], record["sparsity_decoder"])
    steps = ", ".join(str(e["step"]) for e in events) or "none"
    reached = "reached" if schedule["reached_target"] else "**not reached**"
    return [
        Image(BUDGET_PNG, "sparsity against step"),
        Paragraph(
            f"{len(events)} pruning events (steps {steps}); target {reached}; "
            f"{schedule['observations']} score observations, {schedule['skipped_steps']} skipped steps."
        ),
    ]


def model_report(record: Mapping[str, Any], figures: dict[str, Any]) -> tuple[str, list[Block]]:
    """Title and blocks of a `prune-model` report; the figures it shows are added to `figures`."""
    settings = record.get("settings") or {}
    model = settings.get("model", "the model")
    title = f"loraprune prune-model: {record['method']} on {model}"
    layers = record.get("prunable_layers") or []
    span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
    blocks: list[Block] = [
        Heading(title, 1),
        Paragraph(
            f"`{record['method']}` removed {record['sparsity_decoder']:.2%} of the decoder's attention+MLP "
            f"parameters ({record['sparsity_total']:.2%} of all parameters); attention unit "
            f"`{record.get('attention_unit')}`, prunable {span}. {REGENERATE}"
        ),
        Heading("Size and quality"),
    ]
    rows = [
        (
            "parameters (all)",
            _count(record["params_before"]),
            _count(record["params_after"]),
            _change(record["params_before"], record["params_after"]),
        ),
        (
            "decoder attention+MLP parameters",
            _count(record["decoder_params_before"]),
            _count(record["decoder_params_after"]),
            _change(record["decoder_params_before"], record["decoder_params_after"]),
        ),
        _size_row(
            "weight files (*.safetensors)",
            record["params_before"],
            record["params_after"],
            record.get("file_size_bytes"),
        ),
    ]
    perplexity = _perplexity_row(record)
    if perplexity is not None:
        rows.append(perplexity)
    blocks.append(Table(("", "before", "after", "change"), tuple(rows)))
    if perplexity is None:
        blocks.append(
            Paragraph("Perplexity was not evaluated (pass `--eval-data wikitext2` to measure it before and after).")
        )

    figures[WIDTHS_PNG] = plots.kept_widths(record["layers"], record.get("layers_before"))
    blocks += [
        Heading("Kept structure per layer"),
        Image(WIDTHS_PNG, "kept heads, KV groups and channels per layer"),
        _layer_table(record),
    ]

    training = record.get("training")
    blocks.append(Heading("Sparsity against step"))
    if training is None:
        blocks.append(Paragraph("No LoRA training in this run (`--steps 0`): one-shot pruning only."))
    else:
        blocks += _budget_section(record, figures)
    blocks.append(Heading("Training loss"))
    if training is None:
        blocks.append(Paragraph("No LoRA training in this run (`--steps 0`), so there is no loss to plot."))
    else:
        events = (training.get("loraprune") or {}).get("events", [])
        blocks += _loss_section(training.get("loss_history"), training["steps"], events, figures)
        merged = "merged into the saved weights" if settings.get("merge_adapter", True) else "saved in `adapter/`"
        blocks.append(
            Paragraph(
                f"LoRA rank {training['rank']}, alpha {training['alpha']}, learning rate "
                f"{training['learning_rate']:g}, batch {training['batch_size']}, "
                f"{training['train_seconds']:.1f} s of training; the adapter is {merged}."
            )
        )
    blocks += [Heading("Settings"), _settings_table(settings)]
    if record.get("loraprune_settings"):
        blocks += [Paragraph("LoRAPrune schedule:"), _settings_table(record["loraprune_settings"])]
    blocks.append(_environment(record))
    return title, blocks


# ---- prune-adapter -------------------------------------------------------------------------------


def _rank_budget_section(record: Mapping[str, Any], figures: dict[str, Any]) -> list[Block]:
    events = record.get("pruning_events") or []
    if record["method"] in ("lora", "lora-r0"):
        return [Paragraph(f"`{record['method']}` trains at a fixed rank: nothing is pruned.")]
    if not events:
        return [
            Paragraph(
                f"`{record['method']}` recorded no pruning events (AdaLoRA masks ranks inside PEFT; "
                "its final ranks are shown above)."
            )
        ]
    figures[BUDGET_PNG] = plots.rank_against_step(
        events,
        [tuple(pair) for pair in record.get("planned_total_rank") or []],
        record["total_rank_before"],
        record["target_total_rank"],
        record["training"]["steps"],
    )
    return [
        Image(BUDGET_PNG, "total rank against step"),
        Paragraph(
            f"{len(events)} pruning events; total rank {record['total_rank_before']:,} → "
            f"{events[-1]['total_rank']:,} (target {record['target_total_rank']:,})."
        ),
    ]


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _calibration_section(record: Mapping[str, Any], figures: dict[str, Any]) -> list[Block]:
    """Predicted against measured loss changes of the pruning events (PrunedLoRA with a held-out batch)."""
    summary = record.get("calibration")
    if not summary:
        return []
    figures[CALIBRATION_PNG] = plots.calibration_scatter(record["pruning_events"])
    return [
        Heading("Calibration of the pruning score"),
        Image(CALIBRATION_PNG, "predicted against measured loss change"),
        Paragraph(
            "The quadratic model's predicted loss change of every pruning event against the change measured on "
            "held-out training examples (`calibration_examples`), and of single modules' removals measured alone "
            "(`calibration_modules` per event)."
        ),
        Table(
            ("", "pairs", "Spearman rank correlation", "same sign", "predicted total", "measured total"),
            (
                (
                    "pruning events",
                    str(summary["events"]),
                    _number(summary["spearman_events"]),
                    _number(summary["sign_agreement_events"]),
                    _number(summary["predicted_total"], 4),
                    _number(summary["measured_total"], 4),
                ),
                (
                    "single modules",
                    str(summary["module_checks"]),
                    _number(summary["spearman_modules"]),
                    _number(summary["sign_agreement_modules"]),
                    "",
                    "",
                ),
            ),
        ),
        *_statistics_paragraph(record),
    ]


def _statistics_paragraph(record: Mapping[str, Any]) -> list[Block]:
    """The curvature factors measured at the events (`curvature_scale="measured"`) and the statistics' memory."""
    parts = []
    for key, label in (
        ("curvature_factor", "Measured curvature over the Fisher's along each event's removal"),
        ("gradient_factor", "Measured first-order change over the gradient term's"),
    ):
        values = [e[key] for e in record["pruning_events"] if e.get(key) is not None]
        if values:
            parts.append(f"{label}: " + ", ".join(_number(value, 3) for value in values) + ".")
    if record.get("curvature_statistics_bytes"):
        parts.append(
            "The gradient statistics (Gram matrices and gradient sums) held "
            f"{record['curvature_statistics_bytes'] / 2**20:.1f} MiB."
        )
    return [Paragraph(" ".join(parts))] if parts else []


def adapter_report(record: Mapping[str, Any], figures: dict[str, Any]) -> tuple[str, list[Block]]:
    """Title and blocks of a `prune-adapter` report; the figures it shows are added to `figures`."""
    settings = record["settings"]
    model = settings["run"]["model"]
    title = f"loraprune prune-adapter: {record['method']} on {model}"
    ranks = record["final_ranks"]
    dropped = sorted(name for name, rank in ranks.items() if rank == 0)
    modules = record["modules"]
    blocks: list[Block] = [
        Heading(title, 1),
        Paragraph(
            f"`{record['method']}` LoRA adapter on `{model}`, trained on `{settings['run']['data']}`: "
            f"{modules} modules created at rank {record['trained_rank']}, final total rank "
            f"{record['total_rank_after']:,} (mean {record['total_rank_after'] / modules:.2f}); "
            f"{len(dropped)} modules pruned to rank 0 and left out of the adapter. {REGENERATE}"
        ),
        Heading("Size and quality"),
        Table(
            ("", "before (as trained)", "after (saved)", "change"),
            (
                (
                    "adapter parameters",
                    _count(record["adapter_params_before"]),
                    _count(record["adapter_params_after"]),
                    _change(record["adapter_params_before"], record["adapter_params_after"]),
                ),
                (
                    "total LoRA rank",
                    _count(record["total_rank_before"]),
                    _count(record["total_rank_after"]),
                    _change(record["total_rank_before"], record["total_rank_after"]),
                ),
                _size_row(
                    "adapter file (adapter_model.safetensors)",
                    record["adapter_params_before"],
                    record["adapter_params_after"],
                    record["file_size_bytes"],
                ),
                (
                    "base model parameters (unchanged)",
                    _count(record["base_model_params"]),
                    _count(record["base_model_params"]),
                    "unchanged",
                ),
            ),
        ),
        Paragraph(
            "Perplexity was not evaluated: `prune-adapter` only trains and prunes. Measure the adapted model "
            f"with `loraprune eval --model {model} --adapter DIR --data wikitext2`."
        ),
        Heading("Final rank per module"),
    ]
    figures[RANKS_PNG] = plots.rank_heatmap(ranks, record["trained_rank"])
    blocks.append(Image(RANKS_PNG, "final rank per layer and module"))
    if 0 < len(dropped) <= 12:
        blocks.append(Paragraph("Modules at rank 0: " + ", ".join(f"`{name}`" for name in dropped) + "."))
    blocks += [
        Heading("Rank budget against step"),
        *_rank_budget_section(record, figures),
        *_calibration_section(record, figures),
        Heading("Training loss"),
        *_loss_section(
            record["training"]["loss_history"], record["training"]["steps"], record.get("pruning_events") or [], figures
        ),
        Paragraph(f"{record['training']['steps']} steps in {record['training']['train_seconds']:.1f} s."),
        Heading("Settings"),
    ]
    for group in ("run", "pruning", "training"):
        blocks += [Paragraph(f"{group.capitalize()} options:"), _settings_table(settings[group])]
    blocks.append(_environment(record))
    return title, blocks
