"""Run configs (`ml_collections`), one module per run; each has a `get_config()`.

Given to `run_eval.py` / `run_train.py` as `--config configs/NAME.py` (`demo.py` also takes an
argument: `--config configs/demo.py:frames`); the shared defaults are in `common.py`.
"""
