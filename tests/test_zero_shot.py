"""Zero-shot evaluation through lm-eval on a multiple-choice task defined over local data (no hub):
accuracy against direct scoring for dense, pruned (per-layer widths) and adapted models, the
settings reported, and the errors for missing lm-eval and unreachable task data."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

import loraprune.cli.eval_cmd as eval_cmd
from loraprune.cli import main
from loraprune.evaluation import TaskUnavailableError, evaluate_zero_shot, load_tasks
from loraprune.models import load_model

TASK = "loraprune_tiny_mc"
DOCS = [
    {"question": "what colour is the sky", "choices": ["blue", "green", "a shade of red"], "label": 0},
    {"question": "how many legs has a dog", "choices": ["four", "two"], "label": 0},
    {"question": "the opposite of hot", "choices": ["warm", "cold", "very hot indeed", "ice"], "label": 1},
    {"question": "what do bees make", "choices": ["milk", "honey"], "label": 1},
    {"question": "which is a fruit", "choices": ["apple", "brick", "the number 12"], "label": 0},
    {"question": "where do fish live", "choices": ["in trees", "in water"], "label": 1},
    {"question": "what follows monday", "choices": ["friday", "sunday", "tuesday"], "label": 2},
    {"question": "what is 2 plus 2", "choices": ["4", "22", "five"], "label": 0},
]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 3.0
"""
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lm_eval_installed():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'loraprune[eval]'; it is in [dev])")


def write_task(directory, data_file) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data_file))


@pytest.fixture
def task_dir(tmp_path, lm_eval_installed):
    """A multiple-choice lm-eval task over a local JSONL file."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    write_task(tmp_path / "tasks", data)
    return tmp_path / "tasks"


def direct_accuracy(model, tokenizer, docs) -> tuple[float, float]:
    """acc and acc_norm by scoring every choice ourselves: the sum of log-probabilities of the tokens of
    " choice" after the prompt (argmax), and that sum divided by the choice's length in characters."""
    correct = correct_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}?\nAnswer:"
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer.encode(context + " " + choice, add_special_tokens=False)
            with torch.no_grad():
                logprobs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        lengths = [len(choice) for choice in doc["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == doc["label"]
    return correct / len(docs), correct_norm / len(docs)


def test_accuracy_equals_direct_scoring_of_every_choice(tiny_llama, tiny_tokenizer, task_dir):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    result = evaluate_zero_shot(tiny_llama, tiny_tokenizer, TASK, task_dir=str(task_dir), batch_size=3)
    acc, acc_norm = direct_accuracy(tiny_llama, tiny_tokenizer, DOCS)
    (task,) = result.tasks
    assert task.metrics["acc"] == pytest.approx(acc) and task.metrics["acc_norm"] == pytest.approx(acc_norm)
    assert task.metrics["acc_stderr"] == pytest.approx((acc * (1 - acc) / (len(DOCS) - 1)) ** 0.5)
    assert (task.task, task.samples, task.samples_available, task.num_fewshot, task.version) == (TASK, 8, 8, 0, 3.0)
    assert (result.num_fewshot, result.limit, result.batch_size, result.dtype) == (0, None, 3, "float32")
    printed = str(result)
    assert TASK in printed and f"{acc:.4f}" in printed and "lm-eval" in printed


def test_limit_evaluates_the_first_documents_and_says_so(tiny_llama, tiny_tokenizer, task_dir):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    tasks = load_tasks([TASK], str(task_dir))
    result = evaluate_zero_shot(tiny_llama, tiny_tokenizer, tasks, limit=3)
    (task,) = result.tasks
    assert (task.samples, task.samples_available, result.limit) == (3, 8, 3)
    assert task.metrics["acc"] == pytest.approx(direct_accuracy(tiny_llama, tiny_tokenizer, DOCS[:3])[0])
    assert "limit 3 per task" in str(result)


def test_eval_cli_on_a_pruned_model_with_per_layer_widths(tiny_model_dir, task_dir, tmp_path):
    pruned = tmp_path / "pruned"
    assert main(["prune-model", "--model", str(tiny_model_dir), "--sparsity", "0.3", "--output", str(pruned)]) == 0
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog .\n" * 10)
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(pruned),
                "--tasks",
                TASK,
                "--task-dir",
                str(task_dir),
                "--data",
                str(text),
                "--seq-len",
                "16",
                "--device",
                "cpu",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    model, tokenizer = load_model(str(pruned))
    assert model.config.model_type == "loraprune_llama"  # widths differ between layers
    (task,) = report["zero_shot"]["tasks"]
    assert [task["metrics"]["acc"], task["metrics"]["acc_norm"]] == pytest.approx(
        direct_accuracy(model, tokenizer, DOCS)
    )
    assert task["samples"] == 8 and task["version"] == 3.0 and report["zero_shot"]["model"] == str(pruned)
    assert report["perplexity"] > 1  # --data given explicitly: perplexity too, in the same file


def test_eval_cli_on_a_base_model_with_an_adapter(
    tiny_model_dir, tiny_llama, tiny_tokenizer, task_dir, tmp_path, capsys
):
    adapted = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "adapted.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--tasks",
                TASK,
                "--task-dir",
                str(task_dir),
                "--batch-size",
                "5",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert "perplexity" not in report  # --tasks alone: no perplexity
    (task,) = report["zero_shot"]["tasks"]
    assert [task["metrics"]["acc"], task["metrics"]["acc_norm"]] == pytest.approx(
        direct_accuracy(adapted.eval(), tiny_tokenizer, DOCS)
    )
    assert report["adapter"] == str(tmp_path / "adapter") and report["zero_shot"]["batch_size"] == 5
    assert TASK in capsys.readouterr().out


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.setattr(eval_cmd, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["eval", "--tasks", "piqa"]) == 2
    assert "pip install 'loraprune[eval]'" in capsys.readouterr().err


def test_task_data_that_cannot_be_read_fails_before_loading_the_model(task_dir, tmp_path, monkeypatch, capsys):
    write_task(task_dir, tmp_path / "missing.jsonl")
    monkeypatch.setattr(eval_cmd, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["eval", "--tasks", TASK, "--task-dir", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert f"could not load the data of task '{TASK}'" in err and "--task-dir" in err


def test_unreachable_hub_data_is_a_clear_error(task_dir, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskUnavailableError, match=f"task '{TASK}'.*Couldn't reach.*HF_DATASETS_OFFLINE"):
        load_tasks(TASK, str(task_dir))


def test_task_settings_are_validated(tmp_path, capsys):
    assert main(["eval", "--tasks", "piqa", "--task-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--tasks", "piqa", "--limit", "0"]) == 2
    assert "limit" in capsys.readouterr().err
    with pytest.raises(TaskUnavailableError, match="no task"):
        load_tasks(" , ")
