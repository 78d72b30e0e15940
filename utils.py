"""The original's `utils.py`, for scripts that import it from the repository root: the helpers
live in `ntk_evolution/utils.py`."""

from ntk_evolution.utils import *  # noqa: F403
