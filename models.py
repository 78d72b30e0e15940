"""The original's `models.py`, for scripts that import it from the repository root: the Haiku
models live in `ntk_evolution/models.py`."""

from ntk_evolution.models import *  # noqa: F403
