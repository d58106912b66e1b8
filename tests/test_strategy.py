"""The strategy tree: TOML, dotted overrides, validation messages, the resolved round trip."""

import pytest

from regimen.errors import UserError
from regimen.strategy import Strategy, dumps_toml, parse_value, read_toml


def test_defaults_validate_and_resolve():
    s = Strategy().resolve()
    assert s.lr.scale_with_batch == "sqrt"  # adamw is Adam-family
    assert s.lr.reference_batch == s.batch.size
    assert s.train.steps is not None


def test_sgd_family_scales_linearly():
    assert Strategy.load(None, ["optimizer.name=sgd"]).resolve().lr.scale_with_batch == "linear"


def test_overrides_parse_toml_values():
    s = Strategy.load(None, ["optimizer.lr=3e-4", "optimizer.betas=[0.9, 0.95]", "lr.schedule=wsd", "train.steps=10"])
    assert s.optimizer.lr == 3e-4 and s.optimizer.betas == [0.9, 0.95] and s.lr.schedule == "wsd" and s.train.steps == 10
    assert parse_value("true") is True and parse_value("adam") == "adam"


def test_toml_round_trip(tmp_path):
    s = Strategy.load(
        None, ["optimizer.name=sgd", "optimizer.momentum=0.9", "batch.schedule=ramp", "batch.start=8", "batch.span=100"]
    ).resolve()
    path = tmp_path / "s.toml"
    s.save(path)
    again = Strategy.from_dict(read_toml(path))
    assert again == s
    assert again.flat()["optimizer.momentum"] == 0.9


def test_file_then_overrides(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[optimizer]\nname = "adam"\nlr = 0.01\n')
    s = Strategy.load(path, ["optimizer.lr=0.02"])
    assert (s.optimizer.name, s.optimizer.lr) == ("adam", 0.02)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lrr=1"], "unknown key 'optimizer.lrr'; did you mean 'lr'?"),
        (["optimzer.lr=1"], "unknown section 'optimzer'; did you mean 'optimizer'?"),
        (["optimizer.lr=-1"], "optimizer.lr = -1: must be > 0"),
        (["optimizer.lr=fast"], "optimizer.lr = 'fast': expected a number"),
        (["optimizer.name=adamm"], "did you mean 'adam'?"),
        (["optimizer.name=adam", "optimizer.momentum=0.9"], "optimizer.momentum = 0.9: adam has no such parameter"),
        (["lr.schedule=cosin"], "did you mean 'cosine'?"),
        (["train.steps=10", "lr.warmup=10"], "lr.warmup = 10: must be shorter than the budget (train.steps = 10)"),
        (["batch.size=8", "batch.micro=16"], "batch.micro = 16: must be <= batch.size (8)"),
        (["train.steps=10", "train.epochs=1"], "give one budget only"),
        (["optimizer.name=gd"], "use batch.schedule = 'full'"),
        (["model.name=mlp"], "use data.source = 'synthetic'"),
        (["train.precision=fp8"], "allowed: fp32, bf16"),
        (["model.d_model=130"], "must be a multiple of model.n_head"),
        (["batch.schedule=random"], "needs batch.min and batch.max"),
        (["train.steps=1.5"], "expected an integer"),
        (["lr"], "expected section.key=value"),
    ],
)
def test_bad_input_is_one_clear_line(overrides, message):
    with pytest.raises(UserError) as e:
        Strategy.load(None, overrides)
    text = str(e.value)
    assert message in text, text
    assert "\n" not in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Strategy.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        Strategy.load(bad)


def test_replace_validates():
    s = Strategy()
    assert s.replace({"optimizer.lr": 0.5}).optimizer.lr == 0.5
    with pytest.raises(UserError):
        s.replace({"optimizer.lr": 0})


def test_dumps_toml_writes_inline_tables():
    text = dumps_toml({"batch": {"stages": [{"until": 10, "size": 8}]}})
    assert "stages = [{until = 10, size = 8}]" in text


def test_budget_override_replaces_the_files_budget(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[train]\nsteps = 2000\n")
    s = Strategy.load(path, ["train.tokens=1500"])
    assert s.train.tokens == 1500 and s.train.steps is None
    with pytest.raises(UserError, match="give one budget only"):
        Strategy.load(path, ["train.tokens=1500", "train.samples=10"])


def test_optimizer_override_drops_the_files_keys_it_does_not_take(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[optimizer]\nname = "adamw"\nbetas = [0.9, 0.99]\neps = 1e-6\nweight_decay = 0.1\n')
    s = Strategy.load(path, ["optimizer.name=sgd"])
    assert (s.optimizer.name, s.optimizer.betas, s.optimizer.eps, s.optimizer.weight_decay) == ("sgd", None, None, 0.1)
    assert Strategy.load(path, ["optimizer.name=adam"]).optimizer.betas == [0.9, 0.99]
    with pytest.raises(UserError, match="sgd has no such parameter"):
        Strategy.load(path, ["optimizer.name=sgd", "optimizer.betas=[0.9, 0.9]"])


def test_default_task_is_the_fast_recipe_with_a_two_minute_budget():
    """`regimen train` with no CONFIG runs examples/fast_gpt.toml's strategy (it won time_to_loss);
    only the budget and the evaluation interval differ."""
    from pathlib import Path

    default = Strategy.default().resolve().flat()
    fast = Strategy.load(Path(__file__).parents[1] / "examples" / "fast_gpt.toml").resolve().flat()
    differ = {k for k in default.keys() | fast.keys() if default.get(k) != fast.get(k)}
    assert differ == {"train.steps", "train.eval_every"}
    assert default["optimizer.name"] == "muon"
