"""`--device` reaches every phase of every command, and `--device-map auto` is refused where it cannot work.

The machines that run the tests have no GPU, so the device asked for is the CPU while the
default a command would fall back to (`loraprune.devices.default_device`) is made 'meta': a
command that ignored `--device`, or a phase that chose its own device, would then load, move
or see tensors on 'meta' (or none at all), which the spies below record.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import loraprune.cli.eval_cmd as eval_cmd
import loraprune.devices as devices
import loraprune.model_pruning.entry as model_entry
import loraprune.rank_pruning.entry as adapter_entry
import loraprune.rank_pruning.run as adapter_run
import loraprune.semi_structured.entry as nm_entry
import loraprune.training as training
from loraprune.cli import main
from loraprune.config import PruneModelConfig
from loraprune.errors import ConfigError
from loraprune.evaluation import EvalConfig

TEXT = "The quick brown fox jumps over the lazy dog. Question: how many apples are there? " * 30


class PhaseSpy:
    """Records, per phase, the devices of the inputs and weights every module call sees, and where models load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.phase = "outside"
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.loaded: list[str | None] = []
        self.trainer_cpu: list[bool] = []
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(devices, "default_device", lambda: "meta")  # what ignoring --device would pick
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        for value in args:
            if isinstance(value, torch.Tensor):
                self.seen[self.phase].add(f"input {value.device}")
        for param in module.parameters(recurse=False):
            self.seen[self.phase].add(f"weight {param.device}")

    def label(self, module: object, name: str, phase: str | None = None) -> None:
        """Calls of `module.name` run as phase `phase` (default: `name`)."""
        original = getattr(module, name)

        def labelled(*args, **kwargs):
            outer, self.phase = self.phase, phase or name
            try:
                return original(*args, **kwargs)
            finally:
                self.phase = outer

        self.monkeypatch.setattr(module, name, labelled)

    def watch_loading(self, module: object) -> None:
        original = module.load_model

        def spy(*args, **kwargs):
            self.loaded.append(kwargs.get("device"))
            return original(*args, **kwargs)

        self.monkeypatch.setattr(module, "load_model", spy)

    def watch_trainer(self) -> None:
        original = training.training_arguments

        def spy(config, output_dir, use_cpu=None, **options):
            self.trainer_cpu.append(use_cpu)
            return original(config, output_dir, use_cpu=use_cpu, **options)

        self.monkeypatch.setattr(training, "training_arguments", spy)

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def spy(monkeypatch):
    phases = PhaseSpy(monkeypatch)
    yield phases
    phases.close()


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def _only_cpu(spy: PhaseSpy, phases: tuple[str, ...]) -> None:
    for phase in phases:
        assert spy.seen[phase], f"phase {phase} ran no module (or was not reached)"
        assert spy.seen[phase] <= {"input cpu", "weight cpu"}, (phase, spy.seen[phase])
        assert "input cpu" in spy.seen[phase] and "weight cpu" in spy.seen[phase], (phase, spy.seen[phase])


def test_prune_model_runs_every_phase_on_the_requested_device(spy, tiny_model_dir, text_file, tmp_path, one_thread):
    spy.watch_loading(model_entry)
    spy.watch_trainer()
    spy.label(model_entry, "requested_perplexity", "perplexity")
    spy.label(model_entry, "recover", "training")
    spy.label(model_entry, "get_criterion")  # returns the criterion; label its scoring below
    from loraprune.importance.taylor import TaylorCriterion

    spy.label(TaylorCriterion, "score", "scoring")
    out = tmp_path / "pruned"
    argv = ["prune-model", "--model", str(tiny_model_dir), "--output", str(out), "--method", "taylor"]
    argv += ["--sparsity", "0.25", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--data", str(text_file)]
    argv += ["--calibration-samples", "2", "--eval-data", str(text_file), "--eval-seq-len", "16", "--device", "cpu"]
    assert main(argv) == 0
    assert spy.loaded == ["cpu"]
    assert spy.trainer_cpu == [True]
    _only_cpu(spy, ("scoring", "perplexity", "training"))
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["device"] == "cpu" and report["settings"]["device"] == "cpu"
    assert "Environment: device cpu, " in (out / "report.md").read_text()


def test_auto_means_the_default_device(spy, tiny_model_dir, text_file, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(devices, "default_device", lambda: "cpu")
    spy.watch_loading(model_entry)
    out = tmp_path / "pruned"
    argv = ["prune-model", "--model", str(tiny_model_dir), "--output", str(out), "--method", "magnitude"]
    assert main(argv) == 0  # --device auto is the default
    assert spy.loaded == ["cpu"]


def test_prune_nm_runs_every_phase_on_the_requested_device(spy, tiny_model_dir, text_file, tmp_path, one_thread):
    spy.watch_loading(nm_entry)
    spy.watch_trainer()
    spy.label(nm_entry, "requested_perplexity", "perplexity")
    spy.label(nm_entry, "prune_one_shot", "scoring")
    spy.label(nm_entry, "masked_recovery", "training")
    out = tmp_path / "nm"
    argv = ["prune-nm", "--model", str(tiny_model_dir), "--output", str(out), "--method", "wanda", "--steps", "2"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--data", str(text_file), "--calibration-samples", "2"]
    argv += ["--eval-data", str(text_file), "--eval-seq-len", "16", "--device", "cpu"]
    assert main(argv) == 0
    assert spy.loaded == ["cpu"] and spy.trainer_cpu == [True]
    _only_cpu(spy, ("scoring", "perplexity", "training"))


def test_prune_adapter_trains_on_the_requested_device(spy, tiny_model_dir, data_dir, tmp_path, one_thread):
    spy.watch_loading(adapter_entry)  # the entry point loads the model
    spy.watch_trainer()
    spy.label(adapter_run, "train", "training")  # the harness trains
    out = tmp_path / "adapter"
    argv = ["prune-adapter", "--model", str(tiny_model_dir), "--data", str(data_dir / "gsm8k" / "train.jsonl")]
    argv += ["--train-limit", "4", "--max-answer-tokens", "16", "--r0", "4", "--rank", "2", "--steps", "2"]
    argv += ["--batch-size", "2", "--prune-every", "1", "--output", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert spy.loaded == ["cpu"] and spy.trainer_cpu == [True]
    _only_cpu(spy, ("training",))
    assert json.loads((out / "loraprune_report.json").read_text())["device"] == "cpu"
    assert "Environment: device cpu, " in (out / "report.md").read_text()


def test_eval_measures_on_the_requested_device(spy, tiny_model_dir, text_file, tmp_path, one_thread):
    spy.watch_loading(eval_cmd)
    spy.label(eval_cmd, "evaluate_perplexity", "perplexity")
    spy.label(eval_cmd, "measure_latency", "latency")
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--data", str(text_file)]
    argv += ["--seq-len", "16", "--latency", "--repeats", "1", "--warmup", "0", "--gen-tokens", "2"]
    argv += ["--latency-seq-len", "8", "--no-progress", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    assert spy.loaded == ["cpu", "cpu"]
    _only_cpu(spy, ("perplexity", "latency"))
    assert json.loads(out.read_text())["device"] == "cpu"


def test_default_device_is_this_process_gpu(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.default_device() == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.default_device() == "cpu" and devices.resolve_device("auto") == "cpu"


def test_bad_devices_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        devices.resolve_device("gpu")
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\)"):
        devices.resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=1"):
        devices.check_training_device("cuda:1")  # the Trainer of process 0 trains on cuda:0
    devices.check_training_device("cuda:0")


def test_device_map_is_refused_where_the_run_trains(tmp_path):
    with pytest.raises(ConfigError, match="prune-model trains here"):
        PruneModelConfig(output=str(tmp_path), method="taylor", steps=5, device_map="auto")
    with pytest.raises(ConfigError, match="prune-model trains here"):
        PruneModelConfig(output=str(tmp_path), method="loraprune", steps=5, device_map="auto")
    PruneModelConfig(output=str(tmp_path), method="taylor", device_map="auto")
    EvalConfig(device_map="auto")
    with pytest.raises(SystemExit):  # prune-adapter always trains: it has no --device-map
        main(["prune-adapter", "--device-map", "auto"])


def test_device_map_auto_scores_prunes_and_evaluates(tiny_model_dir, text_file, tmp_path, one_thread):
    """On a machine without GPUs accelerate maps every layer to the CPU; the one-shot path runs through it."""
    out = tmp_path / "mapped"
    argv = ["prune-model", "--model", str(tiny_model_dir), "--output", str(out), "--method", "wanda-sp"]
    argv += ["--sparsity", "0.25", "--data", str(text_file), "--seq-len", "16", "--calibration-samples", "2"]
    argv += ["--eval-data", str(text_file), "--eval-seq-len", "16", "--device-map", "auto"]
    assert main(argv) == 0
    report = json.loads((out / "loraprune_report.json").read_text())
    reference = tmp_path / "reference"
    assert main([*argv[:4], str(reference), *argv[5:-2]]) == 0
    expected = json.loads((reference / "loraprune_report.json").read_text())
    assert report["masks"] == expected["masks"] and report["settings"]["device_map"] == "auto"
    assert report["perplexity_after"]["perplexity"] == pytest.approx(expected["perplexity_after"]["perplexity"])


def test_offloaded_weights_are_refused_for_pruning(tiny_llama):
    devices.check_in_memory(tiny_llama)
    tiny_llama.model.layers[1].to("meta")  # what accelerate leaves in place of weights it offloads
    with pytest.raises(ConfigError, match="offloads some weights"):
        devices.check_in_memory(tiny_llama)


def test_device_timing_benchmark_times_both_runs_per_device(tiny_model_dir, text_file, tmp_path, one_thread):
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("device_timing", REPO_ROOT / "benchmarks" / "device_timing.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = tmp_path / "timing"
    argv = ["--model", str(tiny_model_dir), "--devices", "cpu", "--loraprune-steps", "2", "--prune-every", "1"]
    argv += ["--data", str(text_file), "--eval-data", str(text_file), "--eval-max-tokens", "64", "--seq-len", "16"]
    assert benchmark.main([*argv, "--batch-size", "2", "--output", str(output)]) == 0
    results = json.loads(output.with_suffix(".json").read_text())
    assert [(row["method"], row["steps"], row["device"]) for row in results["rows"]] == [
        ("taylor", 0, "cpu"),
        ("loraprune", 2, "cpu"),
    ]
    for row in results["rows"]:
        assert row["wall_seconds"] >= row["prune_seconds"] > 0
        assert row["sparsity_decoder"] == pytest.approx(0.2, abs=0.02)
    table = output.with_suffix(".md").read_text()
    assert "| taylor | 0 | cpu |" in table and "| loraprune | 2 | cpu |" in table
