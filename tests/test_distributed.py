"""Distributed runs on the CPU: 2 processes (gloo) give the decisions of 1 process with the same global batch.

One `torchrun` launch (`distributed_scripts/worker.py`) runs, on 2 ranks:
* `loraprune prune-model --method loraprune` and `loraprune prune-adapter` (PrunedLoRA) under
  DDP through `transformers.Trainer`, with half the per-process batch of the reference;
* both pruners in plain training loops of an FSDP2-sharded model (`fully_shard`).
The references run in this process. Masks and ranks must be equal, weights equal to round-off,
only the main process writes (and reports), and what is saved loads.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, build_tiny_tokenizer
from distributed_scripts.worker import fsdp_run, lora_model
from loraprune.cli import main
from loraprune.io import save_pruned_model
from loraprune.lora import add_lora
from loraprune.model_pruning import ModelPruner, PruningTarget
from loraprune.models import load_model
from loraprune.rank_pruning import RankPruner, RankPruningConfig, export_pruned_adapter
from loraprune.shrink import shrink_model
from loraprune.structure import get_adapter
from model_pruning_helpers import lora_model as tiny_lora_model
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORKER = Path(__file__).parent / "distributed_scripts" / "worker.py"
PROCESSES = 2
GLOBAL_BATCH = 4
STEPS = 8


def prune_model_args(work: Path, output: Path, batch: int) -> list[str]:
    return [
        "prune-model",
        "--model",
        str(work / "model"),
        "--method",
        "loraprune",
        "--sparsity",
        "0.3",
        "--steps",
        str(STEPS),
        "--prune-every",
        "2",
        "--calibration-data",
        str(work / "text.txt"),
        "--seq-len",
        "32",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-2",
        "--batch-size",
        str(batch),
        "--output",
        str(output),
    ]


def prune_adapter_args(work: Path, output: Path, batch: int) -> list[str]:
    return [
        "prune-adapter",
        "--model",
        str(work / "model"),
        "--data",
        str(work / "sft.jsonl"),
        "--max-answer-tokens",
        "24",
        "--r0",
        "8",
        "--rank",
        "2",
        "--schedule",
        "global",
        "--steps",
        str(STEPS),
        "--prune-every",
        "2",
        "--learning-rate",
        "1e-2",
        "--logging-steps",
        "100",
        "--batch-size",
        str(batch),
        "--output",
        str(output),
    ]


def fsdp_runs(work: Path) -> list[dict]:
    return [
        {"model_dir": str(work / "model"), "method": method, "steps": STEPS, "global_batch": GLOBAL_BATCH}
        for method in ("loraprune", "prunedlora")
    ]


def write_inputs(work: Path) -> None:
    """The tiny model (GQA, tied embeddings), a text file and SFT records."""
    build_tiny_llama().save_pretrained(work / "model")
    build_tiny_tokenizer().save_pretrained(work / "model")
    rng = random.Random(0)
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "apples", "answers")
    (work / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    records = []
    for _ in range(16):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        records.append(
            json.dumps(
                {"question": f"how many apples are {a} and {b}?", "answer": f"there are {a + b} apples #### {a + b}"}
            )
        )
    (work / "sft.jsonl").write_text("\n".join(records) + "\n")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The work directory after the 2-process launch, and what the processes printed."""
    work = tmp_path_factory.mktemp("distributed")
    write_inputs(work)
    batch = GLOBAL_BATCH // PROCESSES
    spec = {
        "commands": [
            prune_model_args(work, work / "ddp-model", batch),
            prune_adapter_args(work, work / "ddp-adapter", batch),
        ],
        "fsdp": fsdp_runs(work),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(PROCESSES),
        str(WORKER),
        str(work),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return work, done.stdout


def test_only_the_main_process_writes_and_reports(launched):
    work, printed = launched
    assert printed.count("saved to") == 1  # prune-model's summary, printed by rank 0 only
    assert printed.count("method prunedlora:") == 1
    assert sorted(path.name for path in work.iterdir() if path.name.startswith(".")) == []  # no staging leftovers


def test_ddp_loraprune_matches_one_process(launched, tmp_path, one_thread):
    work, _ = launched
    assert main(prune_model_args(work, tmp_path / "single", GLOBAL_BATCH)) == 0
    reports = [
        json.loads((path / "loraprune_report.json").read_text()) for path in (tmp_path / "single", work / "ddp-model")
    ]
    assert reports[1]["masks"] == reports[0]["masks"]
    assert reports[1]["sparsity_decoder"] == pytest.approx(0.3, abs=0.01)
    weights = [load_file(path / "model.safetensors") for path in (tmp_path / "single", work / "ddp-model")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5)
    model, _ = load_model(str(work / "ddp-model"))
    assert sum(p.numel() for p in model.parameters()) == reports[1]["params_after"]


def test_ddp_prunedlora_matches_one_process(launched, tmp_path, one_thread):
    work, _ = launched
    assert main(prune_adapter_args(work, tmp_path / "single", GLOBAL_BATCH)) == 0
    ranks = [
        json.loads((path / "pruned_ranks.json").read_text())["ranks"]
        for path in (tmp_path / "single", work / "ddp-adapter")
    ]
    assert ranks[1] == ranks[0]
    assert sum(ranks[1].values()) == 2 * 14  # global budget: average rank 2 over 2 layers x 7 modules
    weights = [load_file(path / "adapter_model.safetensors") for path in (tmp_path / "single", work / "ddp-adapter")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-4)
    model, _ = load_model(str(work / "model"), adapter=str(work / "ddp-adapter"))
    assert model.peft_config["default"].rank_pattern == ranks[1]


def test_fsdp_loraprune_matches_one_process_and_the_gathered_model_shrinks(launched, tmp_path, one_thread):
    work, _ = launched
    sharded = torch.load(work / "fsdp-loraprune.pt", weights_only=False)
    single = fsdp_run(**fsdp_runs(work)[0])
    assert sharded["masks"].keys() == single["masks"].keys()
    for key, mask in single["masks"].items():
        assert torch.equal(sharded["masks"][key], mask), key
    assert sum(int((~mask).sum()) for mask in single["masks"].values()) > 0
    for key, score in single["scores"].items():
        torch.testing.assert_close(sharded["scores"][key], score, rtol=1e-4, atol=1e-6)
    for key, value in single["lora"].items():
        torch.testing.assert_close(sharded["lora"][key], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sharded["logits"], single["logits"], rtol=1e-4, atol=1e-5)
    assert "sharded" in sharded["finish_error"] and "finish_error" not in single

    # export: the gathered state dict in an unsharded copy, shrunk, merged, saved, loaded
    copy = lora_model(str(work / "model"), "loraprune")
    copy.load_state_dict(sharded["state_dict"])
    root = copy.get_base_model()
    shrink_model(copy, get_adapter(root).families(root, "auto"), sharded["masks"])
    save_pruned_model(copy.merge_and_unload(), None, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        logits = loaded(input_ids=sharded["probe"]).logits
    torch.testing.assert_close(logits, sharded["logits"], rtol=1e-4, atol=1e-4)


def test_fsdp_prunedlora_matches_one_process_and_the_gathered_adapter_exports(launched, tmp_path, one_thread):
    work, _ = launched
    sharded = torch.load(work / "fsdp-prunedlora.pt", weights_only=False)
    single = fsdp_run(**fsdp_runs(work)[1])
    assert sharded["ranks"] == single["ranks"]
    assert sum(single["ranks"].values()) == 2 * 14
    for key, value in single["lora"].items():
        torch.testing.assert_close(sharded["lora"][key], value, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(sharded["logits"], single["logits"], rtol=1e-4, atol=1e-4)

    copy = lora_model(str(work / "model"), "prunedlora")
    copy.load_state_dict(sharded["state_dict"])
    export_pruned_adapter(copy, sharded["active"], tmp_path / "adapter", str(work / "model"))
    loaded, _ = load_model(str(work / "model"), adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        logits = loaded(input_ids=sharded["probe"]).logits
    torch.testing.assert_close(logits, sharded["logits"], rtol=1e-4, atol=1e-4)


def test_pruners_unwrap_a_ddp_model(tmp_path):
    """A custom loop may hand the DDP wrapper to the pruners: module paths stay the model's own."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = tiny_lora_model()
        wrapped = DistributedDataParallel(plain)
        pruner = ModelPruner(wrapped, 4, PruningTarget(sparsity=0.3))
        assert pruner.model is plain
        ranks = RankPruner(
            DistributedDataParallel(add_lora(tiny_model(), r=8, alpha=8)), RankPruningConfig(r0=8, rank=2, alpha=8), 4
        ).ranks()
        assert len(ranks) == 2 * 7 and all(name.startswith("model.layers.") for name in ranks)
    finally:
        dist.destroy_process_group()
