"""Both pruning callbacks inside `transformers.Trainer` with FSDP2, checked against one unsharded process.

Accelerate turns FSDP on only on accelerators (on the CPU the Trainer falls back to DDP), so
the CPU tests drive FSDP2 through plain loops (tests/test_distributed.py) and this script
checks the Trainer path on GPUs. One GPU is enough to exercise the sharded code (parameters,
gradients and optimizer states are DTensors, the callbacks get the FSDP model):

    python benchmarks/distributed_check.py run --out check/single            # reference, no FSDP
    torchrun --nproc_per_node N benchmarks/distributed_check.py run --fsdp --out check/fsdp
    python benchmarks/distributed_check.py compare check/single check/fsdp --json check/result.json

Each run trains a tiny random Llama (GQA) with LoRA for a few steps, once with
`LoRAPruneCallback` and once with `RankPruningCallback`, on the same global batches; it saves
the masks / ranks, the LoRA weights and the logits of a probe batch, and exports the result
from the gathered state dict (`loraprune.distributed.full_state_dict`): the shrunk, merged
model and the rank-pruned adapter are saved, loaded back and run on the probe batch.
`compare` fails unless the decisions are identical and the weights and logits agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from loraprune.distributed import full_state_dict, full_tensor, is_main_process, is_sharded, wait_for_everyone
from loraprune.io import save_pruned_model
from loraprune.lora import add_lora
from loraprune.model_pruning import LoRAPruneCallback, LoRAPruneConfig, PruningTarget
from loraprune.rank_pruning import RankPruningCallback, RankPruningConfig, export_pruned_adapter
from loraprune.shrink import shrink_model
from loraprune.structure import get_adapter

METHODS = ("loraprune", "prunedlora")
STEPS = 8
GLOBAL_BATCH = 8
SEQ_LEN = 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lora_model(method: str):
    torch.manual_seed(1)
    return add_lora(tiny_llama(), r=4, alpha=8) if method == "loraprune" else add_lora(tiny_llama(), r=8, alpha=8)


def callback(method: str):
    if method == "loraprune":
        return LoRAPruneCallback(PruningTarget(sparsity=0.3), LoRAPruneConfig(prune_every=2))
    return RankPruningCallback(RankPruningConfig(r0=8, rank=2, alpha=8, prune_every=2, schedule="global"))


def run_one(method: str, fsdp: bool, out: Path) -> dict:
    """Train `method` (sharded when `fsdp`), save its decisions and exported result; returns a summary."""
    model = lora_model(method)
    data = torch.randint(0, 256, (STEPS * GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    dataset = [{"input_ids": row, "labels": row} for row in data]
    processes = PartialState(cpu=not torch.cuda.is_available()).num_processes  # starts the process group
    pruning = callback(method)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=STEPS,
            per_device_train_batch_size=GLOBAL_BATCH // processes,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            seed=0,
            data_seed=0,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            label_names=["labels"],
            disable_tqdm=True,
            logging_steps=100,
            use_cpu=not torch.cuda.is_available(),
            fsdp=fsdp,
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if fsdp else None,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, callbacks=[pruning]
        )
        trainer.train()
    model = trainer.model
    sharded = any(is_sharded(p) for p in model.parameters())
    device = next(model.parameters()).device
    probe = data[:2].to(device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float().cpu()
    lora = {n: full_tensor(p.detach()).float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    state = full_state_dict(model)
    pruner = pruning.pruner
    result = {
        "fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "sharded": sharded,
        "processes": processes,
        "lora": lora,
        "logits": logits,
    }
    if method == "loraprune":
        result["masks"] = {key: mask.cpu() for key, mask in pruner.masks.items()}
    else:
        result["ranks"] = pruner.ranks()
        result["active"] = pruner.active_components()
    if is_main_process():
        result["exported_logits_max_diff"] = export_and_reload(method, state, result, probe.cpu(), out)
        torch.save(result, out / f"{method}.pt")
    wait_for_everyone()
    return result


def export_and_reload(method: str, state: dict, result: dict, probe: torch.Tensor, out: Path) -> float:
    """Load the gathered state into an unsharded copy, export it, load the export; max |logits difference|."""
    copy = lora_model(method)
    copy.load_state_dict(state)
    if method == "loraprune":
        root = copy.get_base_model()
        shrink_model(copy, get_adapter(root).families(root, "auto"), result["masks"])
        save_pruned_model(copy.merge_and_unload(), None, out / "pruned-model", overwrite=True)
        loaded = AutoModelForCausalLM.from_pretrained(out / "pruned-model")
    else:
        export_pruned_adapter(copy, result["active"], out / "adapter", overwrite=True)
        loaded = PeftModel.from_pretrained(tiny_llama(), out / "adapter")
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=probe).logits.float()
    return float((logits - result["logits"]).abs().max())


def compare(single_dir: Path, fsdp_dir: Path) -> dict:
    """Decisions equal, weights and logits close, the FSDP run really sharded, exports reproduce the logits."""
    summary: dict = {}
    for method in METHODS:
        single = torch.load(single_dir / f"{method}.pt", weights_only=False)
        sharded = torch.load(fsdp_dir / f"{method}.pt", weights_only=False)
        if method == "loraprune":
            same = all(torch.equal(single["masks"][k], sharded["masks"][k]) for k in single["masks"])
            removed = sum(int((~m).sum()) for m in single["masks"].values())
        else:
            same = single["ranks"] == sharded["ranks"]
            removed = sum(single["ranks"].values())
        summary[method] = {
            "fsdp_enabled": sharded["fsdp_enabled"],
            "sharded_parameters": sharded["sharded"],
            "processes": sharded["processes"],
            "decisions_equal": same,
            "units_removed" if method == "loraprune" else "total_rank": removed,
            "lora_max_diff": max(float((single["lora"][k] - sharded["lora"][k]).abs().max()) for k in single["lora"]),
            "logits_max_diff": float((single["logits"] - sharded["logits"]).abs().max()),
            "export_logits_max_diff": sharded["exported_logits_max_diff"],
        }
        entry = summary[method]
        entry["ok"] = bool(
            entry["sharded_parameters"]
            and same
            and entry["lora_max_diff"] < 1e-3
            and entry["logits_max_diff"] < 1e-3
            and entry["export_logits_max_diff"] < 1e-3
        )
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary["torch"] = torch.__version__
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train both methods and save their results")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (launch with torchrun on GPUs)")
    check = commands.add_parser("compare", help="compare a reference run with an FSDP run")
    check.add_argument("single", type=Path)
    check.add_argument("fsdp", type=Path)
    check.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        for method in METHODS:
            run_one(method, args.fsdp, args.out)
        return 0
    summary = compare(args.single, args.fsdp)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(summary[m]["ok"] for m in METHODS) else 1


if __name__ == "__main__":
    sys.exit(main())
