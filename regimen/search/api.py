"""`rg.tune`: the search of `regimen tune` on any model and data given in Python.

```python
import regimen as rg
best = rg.tune(lambda: MyNet(), (x_train, y_train), loss="cross_entropy",
               validation_data=(x_val, y_val), overrides={"train.epochs": 5}, budget="3x")
rg.fit(MyNet(), (x_train, y_train), loss="cross_entropy", strategy=best)
```

`model_fn` builds a fresh model for each run (every candidate starts from its own initial
weights, seeded by `train.seed`). The runs train in this process (`InProcessExecutor`), each in
its own run directory under `out`, with the same resume and bookkeeping as the command; calling
`tune` again with the same arguments and `out` continues the search.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from regimen.errors import UserError
from regimen.strategy import BUDGET_UNITS, Strategy


def tune(
    model_fn: Callable[[], Any],
    data: Any,
    *,
    loss: Any = None,
    validation_data: Any = None,
    metrics: Sequence[Any] | None = None,
    budget: str | None = None,
    strategy: Strategy | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    space: str | Path | None = None,
    out: str | Path = "tune/python",
    storage: str | None = None,
    verbose: bool = True,
) -> Strategy:
    """Search the strategy for `model_fn()` on `data` within `budget`; returns the best one (also in `out/best.toml`).

    Without `strategy`, the base is `fit`'s (Adam, batch 32, one epoch; set the budget with
    `overrides={"train.epochs": 5}`); `budget` is a multiple of one full run of it (`"3x"`; by default a
    third of the grid's compute, at least 3x).

    Example:
        >>> import torch
        >>> x, y = torch.randn(512, 8), torch.randint(0, 2, (512,))
        >>> best = tune(lambda: torch.nn.Linear(8, 2), (x, y), loss="cross_entropy",
        ...             overrides={"train.steps": 60}, space="space.toml")   # doctest: +SKIP
    """
    from regimen.api import _samples
    from regimen.data import TaskData
    from regimen.executors import InProcessExecutor
    from regimen.search.command import parse_budget
    from regimen.search.engine import Search
    from regimen.search.plan import make_candidates
    from regimen.search.result import write_result
    from regimen.search.space import default_space, read_space
    from regimen.task import Task, resolve_loss, resolve_metrics

    if not callable(model_fn):
        raise UserError("tune: model_fn must be a callable that builds a fresh model, e.g. lambda: MyNet()")
    if isinstance(strategy, (str, Path)):
        strategy = Strategy.load(strategy)
    if strategy is None:
        strategy = Strategy.for_python(
            {
                "optimizer": {"name": "adam"},
                "lr": {"schedule": "constant"},
                "train": {"epochs": 1.0, "eval_samples": 0},
                "observe": {"progress": "none"},
            }
        )
    if overrides:
        keys = dict(overrides)
        if any(f"train.{u}" in keys for u in BUDGET_UNITS):  # a budget replaces the base's, in any unit
            keys = {**{f"train.{u}": None for u in BUDGET_UNITS}, **keys}
        strategy = strategy.replace(keys)
    train, val = _samples(data, "data"), _samples(validation_data, "validation_data") if validation_data is not None else None
    loss_fn, metric_fns = resolve_loss(loss), resolve_metrics(list(metrics) if metrics else None)

    def build(s: Strategy) -> Task:
        import torch

        torch.manual_seed(s.train.seed)  # the initial weights follow the seed, as for the built-in models
        return Task(model_fn(), TaskData(train, val), loss=loss_fn, metrics=metric_fns)

    chosen = read_space(space, strategy) if space is not None else default_space(strategy)
    search = Search(
        strategy,
        chosen,
        parse_budget(budget, None, None, len(make_candidates(strategy, chosen))),
        Path(out),
        executor=InProcessExecutor(build),
        storage_url=storage,
        train_size=len(train) if strategy.train.budget()[0] == "epochs" else None,
    )
    if verbose:
        search.log = lambda line: print(f"regimen tune: {line}")
    search.open()
    try:
        search.run(1)
    finally:
        search.close()
    best, _, _, _ = write_result(search)
    return Strategy.load(best)
