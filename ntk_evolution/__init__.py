"""ntk_evolution: the library behind the entry scripts at the repository root.

A small core (models, data, utils, dynamics, training, parallel, cli, run_lock, figures) and one
subpackage per system:

- attacks/: PGD (pgd), AutoAttack (autoattack), evaluation under attack, their figures;
- kernels/: the empirical NTK (ntk), kernel regression and the closed-form ReLU NTK
  (regression), kernel predictors under attack (predictors), eigen-features (features),
  evolution measures (analysis), their figures;
- similarity/: CKA (cka), the PyTorch networks it compares (torch_models), its figures;
- automata/: Tomita languages and DFAs (languages), the recurrent tagger (rnn), extraction,
  their figures;
- io/: checkpoints and kernel files (checkpoints), what each file must hold (schemas);
- study/: `make reproduce` over seeds: intervals, verdicts, reports, figures.

The package imports nothing from the repository root.
"""

__version__ = "0.3.0"
