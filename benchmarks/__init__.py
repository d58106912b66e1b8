"""regimen's benchmark suite: `python -m benchmarks` (see `benchmarks/__main__.py`).

Not part of the installed package: the benchmarks run from a checkout, and the peers they
compare with (Lightning, Hugging Face, pytorch_optimizer, timm) live in `.bench-venv` only.
"""
