"""ntk_evolution: the library behind the entry scripts at the repository root.

Modules: dynamics (standard / linearized / centered), attacks (PGD), autoattack, training,
evaluation, ntk (empirical NTK), kernel_regression (kernel predictors, closed-form ReLU NTK),
predictors (kernel predictors chosen by flags, under attack), ntk_features, kernel_analysis,
similarity (CKA), parallel (device mesh, several hosts), plots, checkpoints (checkpoint and
kernel files), cli (the shared command line).
"""

__version__ = "0.3.0"
