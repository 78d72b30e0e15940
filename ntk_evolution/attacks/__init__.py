"""Attacks: PGD L-inf and L2 (pgd), AutoAttack's four attacks (autoattack), batched evaluation
under attack with its gradient-masking warnings (evaluation)."""
