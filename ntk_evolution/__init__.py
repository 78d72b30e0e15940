"""ntk_evolution: the library behind the entry scripts at the repository root.

What a script does, a notebook can do with plain values:

    from ntk_evolution import attacks, data, experiment, kernels

    ds = data.load_dataset("digits")
    adv = experiment.phase1(ds, model="cnn_small", adversarial=True, eps=32 / 255, epochs=3)
    lin = experiment.phase2(adv.checkpoint(2), ds, centering=True, lr=0.01, epochs=2)
    K = kernels.empirical_ntk(adv.checkpoint(2), ds.x_train[:100], class_index=0)
    r = attacks.robustness(lin, ds.x_test[:60], ds.y_test[:60], eps=32 / 255)

The public API (docs/library.md) is importable from here: the modules `data`, `experiment`,
`attacks`, `kernels`, and the functions and types below, loaded on first use.

A small core (models, data, utils, dynamics, training, experiment, parallel, cli, run_lock,
figures) and one subpackage per system:

- attacks/: PGD (pgd), AutoAttack (autoattack), evaluation under attack, the robustness runner
  (runner), their figures;
- kernels/: the empirical NTK (ntk), kernel regression and the closed-form ReLU NTK
  (regression), kernel predictors under attack (predictors), eigen-features (features),
  evolution measures (analysis), their figures;
- similarity/: CKA (cka), the PyTorch networks it compares (torch_models), its figures;
- automata/: Tomita languages and DFAs (languages), the recurrent tagger (rnn), extraction,
  their figures;
- io/: checkpoints and kernel files (checkpoints), what each file must hold (schemas), resume;
- study/: `make reproduce` over seeds: intervals, verdicts, reports, figures.

The package imports nothing from the repository root.
"""

import importlib

__version__ = "0.3.0"

# name -> (module, attribute or None for the module itself)
_API = {
    "attacks": ("ntk_evolution.attacks", None),
    "data": ("ntk_evolution.data", None),
    "experiment": ("ntk_evolution.experiment", None),
    "kernels": ("ntk_evolution.kernels", None),
    "load_dataset": ("ntk_evolution.data", "load_dataset"),
    "class_balanced_subset": ("ntk_evolution.data", "class_balanced_subset"),
    "Dataset": ("ntk_evolution.data", "Dataset"),
    "phase1": ("ntk_evolution.experiment", "phase1"),
    "phase2": ("ntk_evolution.experiment", "phase2"),
    "run": ("ntk_evolution.experiment", "run"),
    "Run": ("ntk_evolution.experiment", "Run"),
    "Checkpoint": ("ntk_evolution.io.checkpoints", "Checkpoint"),
    "load_checkpoint": ("ntk_evolution.io.checkpoints", "load_model"),
    "robustness": ("ntk_evolution.attacks.runner", "robustness"),
    "empirical_ntk": ("ntk_evolution.kernels", "empirical_ntk"),
    "kernel_predictor": ("ntk_evolution.kernels", "kernel_predictor"),
    "Dynamics": ("ntk_evolution.dynamics", "Dynamics"),
    "UserError": ("ntk_evolution.utils", "UserError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """The public API, imported on first use (importing the package stays cheap)."""
    if name not in _API:
        raise AttributeError(f"module 'ntk_evolution' has no attribute {name!r}")
    module_name, attribute = _API[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
