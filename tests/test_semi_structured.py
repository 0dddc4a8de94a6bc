"""N:M semi-structured sparsity: masks, SparseGPT against brute force, Wanda, LoRAPrune N:M, merge, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from loraprune.cli import main
from loraprune.errors import ConfigError, LoraPruneError
from loraprune.importance.lora_guided import element_importance
from loraprune.model_pruning import LoRAPruneConfig
from loraprune.semi_structured import (
    MaskedMergedForward,
    NMPattern,
    NMPruner,
    merge_masked,
    nm_mask,
    nm_modules,
    nm_summary,
    pattern_mask,
    pattern_violations,
    prune_one_shot,
    sparsegpt_prune,
    to_semi_structured,
)
from loraprune.semi_structured.layerwise import InputHessian, prune_layer_by_layer
from loraprune.semi_structured.one_shot import wanda_scores
from loraprune.semi_structured.targets import base_linear
from model_pruning_helpers import base_weights, lora_model
from tiny_models import tiny_model, token_batch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models run fastest on one thread, and the machine is shared."""


def _nonzeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros of every group of m consecutive inputs, counted independently of the library."""
    out, width = weight.shape
    return torch.tensor([[int((weight[i, k : k + m] != 0).sum()) for k in range(0, width, m)] for i in range(out)])


# ------------------------------------------------------------------------------------------- pattern


def test_pattern_parse_and_validation():
    assert NMPattern.parse(" 2:4 ") == NMPattern(2, 4) and str(NMPattern(4, 8)) == "4:8"
    assert NMPattern(2, 4).sparsity == 0.5
    for bad in ("4:4", "0:4", "3:2", "2-4", "a:b", "2:"):
        with pytest.raises(ConfigError):
            NMPattern.parse(bad)
    with pytest.raises(ConfigError, match="not a multiple of M=8"):
        NMPattern(4, 8).check_width(36, "layer")


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    scores = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(n * m))
    mask = nm_mask(scores, m, n)
    assert (_nonzeros_per_group(mask, m) == n).all()
    for i in range(6):
        for k in range(0, 4 * m, m):
            expected = set(scores[i, k : k + m].argsort(descending=True)[:n].tolist())
            assert set(torch.nonzero(mask[i, k : k + m]).flatten().tolist()) == expected


def test_nm_mask_with_ties_keeps_exactly_n_and_respects_allowed():
    assert (_nonzeros_per_group(pattern_mask(torch.zeros(3, 8), NMPattern(2, 4)), 4) == 2).all()
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    three = nm_mask(scores, 4, 3)
    two = nm_mask(-scores, 4, 2, allowed=three)  # prefers the weights `three` dropped, but may not take them
    assert not (two & ~three).any() and (_nonzeros_per_group(two, 4) == 2).all()
    with pytest.raises(LoraPruneError, match="fewer than 3"):
        nm_mask(scores, 4, 3, allowed=two)


def test_pattern_violations_counts_groups_exactly():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]])
    assert pattern_violations(weight, NMPattern(2, 4)) == 1
    assert pattern_violations(weight, NMPattern(3, 4)) == 0
    assert pattern_violations(weight, NMPattern(1, 4)) == 3


def test_nm_modules_lists_the_seven_projections_and_checks_widths():
    model = tiny_model(layers=2)
    names = nm_modules(model, NMPattern(2, 4))
    assert [n.rsplit(".", 1)[-1] for n in names] == list(PROJECTIONS) * 2
    assert all(n.startswith("model.layers.1.") for n in nm_modules(model, NMPattern(2, 4), layers="1"))
    with pytest.raises(ConfigError, match=r"input features, not a multiple of M=5"):
        nm_modules(model, NMPattern(2, 5))


# ------------------------------------------------------------------------------------------ SparseGPT


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features of very different scales, as activations are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5
    scales = torch.exp(1.5 * torch.randn(width, generator=generator, dtype=torch.float64))
    return (torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mixing + 0.3) * scales


def test_sparsegpt_update_of_a_pruned_column_is_the_least_squares_solution():
    """With 3:4 on a 4-wide layer each row loses one column j; OBS compensates with the columns right of j.

    Brute force: with the columns left of j fixed (already processed) and w_j = 0, the columns right of
    j minimise ‖(w − ŵ)·X_augᵀ‖, where X_aug appends √λ·I to the inputs (the damping as data).
    """
    x = _correlated_inputs(64, 4, seed=0)
    weight = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hessian = x.T @ x / x.shape[0]
    damp = 0.01
    pruned, keep = sparsegpt_prune(weight, hessian, NMPattern(3, 4), block_size=4, damp=damp)
    assert pruned.dtype == torch.float64
    lam = damp * hessian.diagonal().mean()
    x_aug = torch.cat([x / x.shape[0] ** 0.5, lam.sqrt() * torch.eye(4, dtype=torch.float64)])
    positions = set()
    for i in range(16):
        (j,) = torch.nonzero(~keep[i]).flatten().tolist()
        positions.add(j)
        expected = weight[i].clone()
        expected[j] = 0.0
        if j < 3:
            target = x_aug @ weight[i] - x_aug[:, :j] @ weight[i, :j]
            expected[j + 1 :] = torch.linalg.lstsq(x_aug[:, j + 1 :], target[:, None]).solution.flatten()
        torch.testing.assert_close(pruned[i], expected, rtol=1e-9, atol=1e-9)
        assert pruned[i, j] == 0.0
    assert 0 in positions and len(positions) >= 3, positions  # the full update (j = 0) and others were exercised


def test_sparsegpt_result_does_not_depend_on_the_block_size():
    x = _correlated_inputs(256, 32, seed=2)
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = [sparsegpt_prune(weight, x.T @ x, NMPattern(2, 4), block_size=b) for b in (4, 8, 32)]
    for pruned, keep in results[1:]:
        assert torch.equal(keep, results[0][1])
        torch.testing.assert_close(pruned, results[0][0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    x = _correlated_inputs(512, 64, seed=4).float()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    pruned, keep = sparsegpt_prune(weight, x.T @ x / 512, pattern)
    assert pattern_violations(pruned, pattern) == 0 and not pruned[~keep].any()
    assert (_nonzeros_per_group(keep, pattern.m) == pattern.n).all()
    wanda = weight * pattern_mask(wanda_scores(weight, x.norm(dim=0)), pattern)
    magnitude = weight * pattern_mask(weight.abs(), pattern)

    def error(w: torch.Tensor) -> float:
        return float((x @ weight.T - x @ w.T).norm())

    assert error(pruned) < error(wanda) < error(magnitude)


def test_sparsegpt_zeroes_inputs_that_are_never_active():
    x = _correlated_inputs(128, 8, seed=6).float()
    x[:, 5] = 0.0
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    pruned, _ = sparsegpt_prune(weight, x.T @ x, NMPattern(2, 4))
    assert not pruned[:, 5].any() and torch.isfinite(pruned).all()


# ------------------------------------------------------------------------------------- one-shot, layer-wise


def test_layer_by_layer_statistics_are_those_of_the_pruned_model():
    """Layer l is calibrated on what the already pruned layers < l produce (checked on q_proj, whose
    input depends only on earlier layers), and every projection ends up 2:4."""
    model = tiny_model(layers=3)
    batches = token_batch(batch=6, length=12)
    modules = nm_modules(model, NMPattern(2, 4))
    recorded = {}

    def prune(name, linear, stat):
        recorded[name] = stat.hessian().clone()
        keep = pattern_mask(linear.weight.abs(), NMPattern(2, 4))
        linear.weight.data.mul_(keep)
        return keep

    masks = prune_layer_by_layer(model, batches, modules, InputHessian, prune, batch_size=4)
    assert set(masks) == set(modules)
    seen = {}
    hooks = [
        base_linear(model, name).register_forward_pre_hook(
            lambda _m, args, n=name: seen.setdefault(n, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in modules
        if name.endswith("q_proj")
    ]
    with torch.no_grad():
        model(input_ids=batches)
    for hook in hooks:
        hook.remove()
    for name, inputs in seen.items():
        torch.testing.assert_close(recorded[name], inputs.T @ inputs / inputs.shape[0], rtol=1e-4, atol=1e-5)
    assert nm_summary(model, modules, NMPattern(2, 4))["violating_groups"] == 0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_methods_prune_every_projection_to_the_pattern(method):
    model = tiny_model(layers=2)
    dense = {name: base_linear(model, name).weight.detach().clone() for name in nm_modules(model, NMPattern(4, 8))}
    batches = token_batch(batch=8, length=12)
    first_q_input = {}
    handle = base_linear(model, "model.layers.0.self_attn.q_proj").register_forward_pre_hook(
        lambda _m, args: first_q_input.setdefault("x", args[0].reshape(-1, args[0].shape[-1]).clone())
    )
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    masks = prune_one_shot(model, method, NMPattern(4, 8), list(dense), batches, batch_size=3)
    for name, weight in dense.items():
        pruned = base_linear(model, name).weight
        assert (_nonzeros_per_group(pruned, 8) <= 4).all() and not pruned[~masks[name]].any()
        if method != "sparsegpt":  # no weight update: the kept weights are the dense ones
            assert torch.equal(pruned[masks[name]], weight[masks[name]])
    first = "model.layers.0.self_attn.q_proj"
    if method == "magnitude":
        assert torch.equal(masks[first], pattern_mask(dense[first].abs(), NMPattern(4, 8)))
    if method == "wanda":
        norms = first_q_input["x"].norm(dim=0)
        assert torch.equal(masks[first], pattern_mask(dense[first].abs() * norms, NMPattern(4, 8)))
    if method == "sparsegpt":
        assert not torch.equal(base_linear(model, first).weight[masks[first]], dense[first][masks[first]])


def test_one_shot_needs_calibration_data_and_a_known_method():
    model = tiny_model()
    modules = nm_modules(model, NMPattern(2, 4))
    with pytest.raises(ConfigError, match="calibration"):
        prune_one_shot(model, "wanda", NMPattern(2, 4), modules)
    with pytest.raises(ConfigError, match="unknown one-shot"):
        prune_one_shot(model, "taylor", NMPattern(2, 4), modules)


# ------------------------------------------------------------------------------------- masked LoRA forward


def _randomise_lora(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _random_masks(model, pattern: NMPattern, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: pattern_mask(torch.rand(base_linear(model, name).weight.shape, generator=generator), pattern)
        for name in nm_modules(model, pattern)
    }


def test_masked_forward_equals_the_merged_masked_model():
    model = lora_model(layers=2)
    _randomise_lora(model)
    masks = _random_masks(model, NMPattern(2, 4))
    ids = token_batch()
    with torch.no_grad():
        plain_lora = model(input_ids=ids).logits
        with MaskedMergedForward(model, masks):
            masked = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, plain_lora)  # remove() restores PEFT's forward
        MaskedMergedForward(model, masks)
        merged = merge_masked(model, masks)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(merged(input_ids=ids).logits, masked, rtol=0, atol=1e-5)
    assert (masked - plain_lora).abs().max() > 1e-2  # the masks matter
    for name, keep in masks.items():
        weight = base_linear(merged, name).weight
        assert (_nonzeros_per_group(weight, 4) <= 2).all() and not weight[~keep].any()


def test_masked_forward_is_a_linear_of_the_masked_merged_weight():
    """The masked forward is a plain F.linear of the masked merged weight (bias included)."""
    model = lora_model(layers=1)
    _randomise_lora(model, seed=3)
    masks = _random_masks(model, NMPattern(2, 4), seed=4)
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_base_model().get_submodule(name)
    x = torch.randn(3, layer.get_base_layer().in_features)
    base = layer.get_base_layer()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    with torch.no_grad(), MaskedMergedForward(model, masks):
        torch.testing.assert_close(layer(x), F.linear(x, masks[name] * (base.weight + delta), base.bias))


def test_masked_forward_gradients_are_those_of_the_masked_merged_weight():
    """∂L/∂B = s·(mask ⊙ ∂L/∂W)·Aᵀ and ∂L/∂A = s·Bᵀ·(mask ⊙ ∂L/∂W): LoRA learns only where weights are kept."""
    model = lora_model(layers=1)
    _randomise_lora(model)
    masks = _random_masks(model, NMPattern(2, 4))
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_base_model().get_submodule(name)
    ids = token_batch()
    captured = {}
    layer.register_forward_hook(lambda _m, args, out: captured.update(x=args[0], out=out))
    with MaskedMergedForward(model, masks):
        loss = model(input_ids=ids, labels=ids).loss
        grad_out = torch.autograd.grad(loss, captured["out"], retain_graph=True)[0]
        loss.backward()
    x = captured["x"].detach().reshape(-1, captured["x"].shape[-1])
    grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x  # ∂L/∂W of y = x·Wᵀ + b
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    masked_grad = masks[name] * grad_w
    torch.testing.assert_close(b.grad, s * masked_grad @ a.detach().T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, s * b.detach().T @ masked_grad, rtol=1e-4, atol=1e-6)


def test_masked_forward_refuses_layers_it_cannot_reproduce():
    from loraprune.lora import add_lora

    partial = add_lora(tiny_model(), r=4, target_modules=("q_proj",))
    with pytest.raises(LoraPruneError, match="has no LoRA adapter"):
        MaskedMergedForward(partial, _random_masks(partial, NMPattern(2, 4)))
    dropout = add_lora(tiny_model(), r=4, dropout=0.1)
    with pytest.raises(LoraPruneError, match="dropout"):
        MaskedMergedForward(dropout, _random_masks(dropout, NMPattern(2, 4)))


# ------------------------------------------------------------------------------------------ LoRAPrune N:M


@pytest.mark.parametrize(
    ("pattern", "events"), [(NMPattern(2, 4), ["3:4", "2:4"]), (NMPattern(4, 8), ["7:8", "6:8", "5:8", "4:8"])]
)
def test_loraprune_nm_custom_loop(pattern, events):
    """Moving-average element importance, cubic per-group schedule, monotone masks chosen by the scores,
    masked forward == merged model, and the merged model holds the pattern exactly."""
    model = lora_model(layers=2)
    config = LoRAPruneConfig(prune_every=1, warmup=0.1, cooldown=0.2, ema=0.9)
    steps = 10
    pruner = NMPruner(model, steps, pattern, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4, length=12)
    first = pruner.modules[0]
    layer = pruner.forward.layers[first]
    expected_average = None
    previous = {name: mask.clone() for name, mask in pruner.masks.items()}
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for _, p in base_weights(model))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        importance = element_importance(layer.get_base_layer().weight, a, b, layer.scaling["default"], a.grad, b.grad)
        if not pruner.finished:
            expected_average = importance if expected_average is None else 0.9 * expected_average + 0.1 * importance
            assert pruner.observe()
            torch.testing.assert_close(pruner.scores[first], expected_average)
            scores = {name: score.clone() for name, score in pruner.scores.items()}
        optimizer.step()
        event = pruner.after_optimizer_step()
        optimizer.zero_grad()
        if event is not None:
            keep = int(event["pattern"].split(":")[0])
            for name, mask in pruner.masks.items():
                assert not (mask & ~previous[name]).any(), "a pruned weight came back"
                assert torch.equal(mask, nm_mask(scores[name], pattern.m, keep, allowed=previous[name]))
            previous = {name: mask.clone() for name, mask in pruner.masks.items()}
    assert [e["pattern"] for e in pruner.history] == events
    assert pruner.finished and pruner.history[-1]["step"] == pruner.schedule.ramp_end == 8
    assert pruner.scores == {}  # freed once the pattern is final
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        merged = pruner.finish()
        torch.testing.assert_close(merged(input_ids=ids).logits, masked, rtol=0, atol=1e-5)
    for name in nm_modules(merged, pattern):
        counts = _nonzeros_per_group(base_linear(merged, name).weight, pattern.m)
        assert (counts <= pattern.n).all() and counts.sum() == pattern.n * counts.numel()


def test_loraprune_nm_skips_non_finite_importance(caplog):
    model = lora_model(layers=1)
    pruner = NMPruner(model, 10, NMPattern(2, 4))
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    next(p for n, p in model.named_parameters() if "lora_A" in n).grad[0, 0] = float("nan")
    assert not pruner.observe()
    assert pruner.skipped_steps == 1 and pruner.scores == {} and "non-finite" in caplog.text


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return path


def _prune_nm(model_dir: Path, out: Path, *extra: str) -> int:
    return main(["prune-nm", "--model", str(model_dir), "--output", str(out), *extra])


def _check_saved_model(out: Path, pattern: NMPattern) -> dict:
    from loraprune.models import load_model

    report = json.loads((out / "loraprune_report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config  # the stock config
    model, _ = load_model(str(out))
    names = nm_modules(model, pattern)
    zeros = 0
    for name in names:
        weight = base_linear(model, name).weight
        assert (_nonzeros_per_group(weight, pattern.m) <= pattern.n).all(), name
        zeros += int((weight == 0).sum())
    assert report["nm"]["violating_groups"] == 0 and report["nm"]["zeros"] == zeros
    assert report["nm"]["sparsity"] >= pattern.sparsity
    return report


def test_prune_nm_loraprune_saves_a_stock_model_holding_the_pattern(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "nm"
    assert (
        _prune_nm(
            tiny_model_dir,
            out,
            "--method",
            "loraprune",
            "--pattern",
            "2:4",
            "--steps",
            "4",
            "--prune-every",
            "1",
            "--warmup",
            "0",
            "--cooldown",
            "0",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--calibration-data",
            str(text_file),
            "--eval-data",
            str(text_file),
            "--eval-seq-len",
            "16",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "2:4" in printed and "perplexity" in printed
    report = _check_saved_model(out, NMPattern(2, 4))
    assert [e["pattern"] for e in report["training"]["loraprune_nm"]["events"]][-1] == "2:4"
    assert report["perplexity_after"]["tokens"] == report["perplexity_before"]["tokens"] > 0


def test_prune_nm_sparsegpt_with_masked_recovery(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "nm"
    assert (
        _prune_nm(
            tiny_model_dir,
            out,
            "--method",
            "sparsegpt",
            "--pattern",
            "4:8",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--calibration-samples",
            "4",
            "--calibration-data",
            str(text_file),
            "--eval-data",
            str(text_file),
            "--eval-seq-len",
            "16",
        )
        == 0
    )
    report = _check_saved_model(out, NMPattern(4, 8))
    assert report["perplexity_one_shot"] is not None and report["training"]["steps"] == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--pattern", "4:4"), "1 <= N < M"),
        (("--pattern", "2:3"), "not a multiple of M=3"),
        (("--method", "loraprune"), "--steps"),
        (("--method", "sparsegpt", "--pattern", "2:4", "--sparsegpt-block-size", "6"), "multiple of M=4"),
    ],
)
def test_prune_nm_refuses_bad_settings(tiny_model_dir, tmp_path, capsys, options, message):
    assert _prune_nm(tiny_model_dir, tmp_path / "o", "--method", "magnitude", *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_semi_structured_kernels_need_cuda():
    model = tiny_model()
    with pytest.raises(LoraPruneError, match="CUDA"):
        to_semi_structured(model, nm_modules(model, NMPattern(2, 4)))


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_default_model_loraprune_2_4_masked_equals_merged(default_model_dir):
    """Two LoRAPrune 2:4 steps on the real SmolLM2 (both events at once): every group of its 210
    projections keeps exactly 2 of 4 after merging, and the merged model computes the masked one."""
    from loraprune.lora import add_lora
    from loraprune.models import load_model

    model, tokenizer = load_model(str(default_model_dir))
    model = add_lora(model, r=4)
    pruner = NMPruner(model, 2, NMPattern(2, 4), LoRAPruneConfig(prune_every=1, warmup=0.0, cooldown=0.0))
    ids = tokenizer("Semi-structured sparsity keeps two of every four weights. " * 2, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        pruner.observe()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
    assert pruner.finished
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        merged = pruner.finish()
        torch.testing.assert_close(merged(input_ids=ids).logits, masked, rtol=0, atol=1e-5)
    summary = nm_summary(merged, nm_modules(merged, NMPattern(2, 4)), NMPattern(2, 4))
    assert summary["modules"] == 210 and summary["violating_groups"] == 0
    assert summary["zeros"] == summary["weights"] // 2 == 106_168_320 // 2
