"""Parameter groups: who gets weight decay, who goes to Muon, and that nobody is counted twice.

Checked on the built-in GPT (tied embedding and head, LayerNorms, biases) through
`build_optimizer`, the path the trainer takes, by parameter name: the expectation is written
from the model's structure here, not recomputed with regimen's own rule.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regimen.models import GPT, MLP, GPTConfig
from regimen.optim import CombinedOptimizer, build_optimizer
from regimen.strategy import OptimizerConfig

WD = 0.1


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16))


def _names(model: nn.Module) -> dict[int, str]:
    # remove_duplicate=False would list the tied head separately; the default lists it once,
    # under the embedding's name (tok_emb.weight), which is what a group must hold.
    return {id(p): n for n, p in model.named_parameters()}


def _by_decay(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[set[str], set[str]]:
    names = _names(model)
    decayed, undecayed = set(), set()
    for group in opt.param_groups:
        for p in group["params"]:
            (decayed if group["weight_decay"] > 0 else undecayed).add(names[id(p)])
    return decayed, undecayed


def _hidden_matrices(model: GPT) -> set[str]:
    """The 2-D Linear weights inside the transformer blocks."""
    return {f"blocks.{i}.{name}.weight" for i in range(len(model.blocks)) for name in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}


def _assert_each_once(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter appears in more than one group"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is missing from the groups"


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_decay_only_on_linear_weights(name: str) -> None:
    model = _gpt()
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=1e-3, weight_decay=WD))
    _assert_each_once(model, opt)
    decayed, undecayed = _by_decay(model, opt)
    assert decayed == _hidden_matrices(model)
    assert model.head.weight is model.tok_emb.weight  # tied: the head is the embedding
    assert "tok_emb.weight" in undecayed and "pos_emb.weight" in undecayed
    assert {n for n in undecayed if n.endswith(".bias")} == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert {n for n in undecayed if "ln" in n} == {n for n, _ in model.named_parameters() if "ln" in n}
    assert all(g["weight_decay"] in (0.0, WD) for g in opt.param_groups)


def test_untied_output_layer_is_decayed() -> None:
    # An MLP's last Linear is an ordinary weight matrix: decayed like the others.
    model = MLP(6, [8, 8], 3)
    opt = build_optimizer(model, OptimizerConfig(name="adamw", weight_decay=WD))
    decayed, undecayed = _by_decay(model, opt)
    assert decayed == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert undecayed == {"net.0.bias", "net.2.bias", "net.4.bias"}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_decay_all_decays_everything(name: str) -> None:
    model = _gpt()
    opt = build_optimizer(model, OptimizerConfig(name=name, weight_decay=WD, decay_all=True))
    _assert_each_once(model, opt)
    decayed, undecayed = _by_decay(model, opt)
    assert not undecayed
    assert decayed == set(_names(model).values())


def test_zero_weight_decay_is_one_group() -> None:
    model = _gpt()
    opt = build_optimizer(model, OptimizerConfig(name="adamw"))
    _assert_each_once(model, opt)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0


def test_muon_on_hidden_matrices_adamw_on_the_rest() -> None:
    model = _gpt()
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=0.02, weight_decay=WD))
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = _names(model)
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == _hidden_matrices(model)
    # Embeddings (and so the tied head), biases and norms: AdamW, without decay.
    assert in_adamw == set(names.values()) - _hidden_matrices(model)
    _assert_each_once(model, opt)
    decayed, undecayed = _by_decay(model, opt)
    assert decayed == _hidden_matrices(model) and undecayed == in_adamw
    # The groups are live views: the trainer's lr writes reach the inner optimizers.
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert all(g["lr"] == 0.5 for o in opt.optimizers for g in o.param_groups)
    assert all("initial_lr" in g for g in opt.param_groups)


def test_muon_leaves_an_untied_output_layer_to_adamw() -> None:
    # The last Linear of the model is the output layer: AdamW, but still decayed (2-D weight).
    model = MLP(6, [8, 8], 3)
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=0.02, weight_decay=WD))
    muon, adamw = opt.optimizers
    names = _names(model)
    assert {names[id(p)] for g in muon.param_groups for p in g["params"]} == {"net.0.weight", "net.2.weight"}
    assert {names[id(p)] for g in adamw.param_groups for p in g["params"]} == {"net.4.weight", "net.0.bias", "net.2.bias", "net.4.bias"}
    decayed, _ = _by_decay(model, opt)
    assert decayed == {"net.0.weight", "net.2.weight", "net.4.weight"}
    _assert_each_once(model, opt)


def test_frozen_parameters_are_left_out() -> None:
    model = _gpt()
    model.pos_emb.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimizerConfig(name="adamw", weight_decay=WD))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.pos_emb.weight) not in held
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_muon_without_hidden_matrices() -> None:
    # A single Linear is its own output layer: nothing for Muon, everything for AdamW.
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=0.02, weight_decay=WD))
    _assert_each_once(model, opt)
