"""The original's `data.py`, for scripts that import it from the repository root: the datasets
and batches live in `ntk_evolution/data.py`."""

from ntk_evolution.data import *  # noqa: F403
