"""`regimen tune`: the strategy search (probe, race, result), one concept per module.

- `space`: the families of strategies and the `--space` TOML file;
- `plan`: candidates, rungs and the compute of each phase (pure: the same in every process);
- `probe`: the LR range test per family and the batch decision from the noise scale;
- `study`: the Optuna study that records and shares the work between processes;
- `engine`: the search: units of work through an executor (`regimen.executors`), resumable;
- `result`: best.toml and the race in the report;
- `command` (`regimen tune`) and `api` (`rg.tune`).

See docs/tune.md for the method, its defaults and what was measured.

Example:
    >>> from regimen.search.plan import rung_budgets
    >>> rung_budgets(2700, eta=3, rungs=4)
    [100, 300, 900, 2700]
"""
