"""Attacks: PGD L-inf and L2 (pgd), AutoAttack's four attacks (autoattack), batched evaluation
under attack with its gradient-masking warnings (evaluation), and the robustness runner
(runner): `robustness(run_or_checkpoint, x, y, eps=...)` from plain values."""

from ntk_evolution.attacks.runner import robustness

__all__ = ["robustness"]
