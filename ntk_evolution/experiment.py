"""The experiment of Loo et al. (NeurIPS 2022) as functions of plain values.

Phase 1 trains a network with standard dynamics (SGD, lr 0.1 -> 0.01 after epoch 100 -> 0.001
after epoch 150) on clean or adversarial data. Phase 2 starts from its parameters theta_t and
trains w under linearized dynamics f(x; theta_t) + J(x; theta_t)(w - theta_t) (centered:
J(x; theta_t)(w - theta_t) only), or standard dynamics, with BatchNorm frozen.

    from ntk_evolution import data, experiment
    ds = data.load_dataset("digits")
    adv = experiment.phase1(ds, model="cnn_small", adversarial=True, eps=32 / 255, epochs=3)
    lin = experiment.phase2(adv.checkpoint(2), ds, centering=True, lr=0.01, epochs=2)

`run` is run_exp.py's whole run (phase 1 then phase 2 into one folder); `phase1` and `phase2`
are its halves: phase1(...) is `run_exp.py --linear_epochs 0 --save_models --constant_save`,
phase2(theta, ...) is `run_exp.py --base_model_path <theta's file> --save_models`, with the
same numbers bit for bit. Each returns a Run: its final Checkpoint, the checkpoints it saved
(`checkpoint(epoch)`), its metrics (metrics.csv's rows) and results (results.pkl's dict).

With `save_dir` a run writes exactly what run_exp.py writes into --save_path (checkpoints,
results.pkl, metrics.csv, training_curves.png, resume_state.pkl), holds the folder's lock while
it runs, and `resume=True` continues an interrupted run. Without it nothing is written, and the
run keeps in memory, as NumPy arrays on the host, the checkpoints it would have written: with
`constant_save` one at the start of every epoch of phase 1 and at the original's fractional
epochs (0.125 ... 2.5), with `constant_save_linear` one per phase-2 epoch, and always the final
one. For ResNet-18 each is about 45 MB: pass `save_dir` for long runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ntk_evolution.attacks.evaluation import evaluate
from ntk_evolution.attacks.pgd import DEFAULT_EPS_255, eps_from_255
from ntk_evolution.data import Dataset, num_batches
from ntk_evolution.dynamics import PHASE1, Dynamics
from ntk_evolution.figures import plot_training_curves
from ntk_evolution.io.checkpoints import (
    DEFAULT_MODEL,
    Checkpoint,
    check_tree_matches,
    checkpoint_epoch,
    checkpoint_meta,
    checkpoint_name,
    load_model,
    run_of_folder,
    save_checkpoint,
)
from ntk_evolution.io.resume import (
    METRICS_FILE,
    RESUME_CONFIG,
    Position,
    fractional_saves,
    load_resume_state,
    save_resume_state,
)
from ntk_evolution.io.schemas import RESUME_TODO, check_results
from ntk_evolution.models import get_model, init_model
from ntk_evolution.parallel import default_compile_cache, use_default_compile_cache
from ntk_evolution.run_lock import folder_lock
from ntk_evolution.training import (
    TrainingLog,
    TrainState,
    init_train_state,
    is_adversarial_epoch,
    make_optimizer,
    make_train_step,
    phase1_learning_rate,
    run_epoch,
    set_learning_rate,
)
from ntk_evolution.utils import UserError, is_writer, save_pickle, to_numpy

PHASE1_LR = 0.1
RESULTS_FILE = "results.pkl"
CURVES_FILE = "training_curves.png"

# run_exp.py's flags with their defaults (the original's, plus this project's): what a checkpoint
# records in meta['flags'], and what --resume compares (resume.RESUME_CONFIG)
RUN_FLAGS: dict[str, Any] = {
    "data_path": "./X_nothing",
    "standard_epochs": 100,
    "linear_epochs": 100,
    "centering": False,
    "save_models": False,
    "constant_save": False,
    "constant_save_linear": False,
    "loose_bn_second": False,
    "do_standard_second": False,
    "skip_first_test": False,
    "skip_second_test": False,
    "random_seed": 0,
    "base_model_path": "",
    "model": None,
    "dataset": None,
    "loaders": "CC",
    "second_lr": 0.01,
    "eps": DEFAULT_EPS_255,
    "save_path": "./saved_models/",
    "n_test": None,
    "n_train": None,
    "batch_size": 128,
    "resume": False,
    "train_path": "",
    "pure_pgd": False,
}


@dataclasses.dataclass
class Run:
    """A finished run: `final` its last network (parameters_final.pkl's content), `results`
    (results.pkl's: {'standard', 'linear': {'clean', 'linf', 'l2'} or None, 'standard_second'}),
    `metrics` (metrics.csv's rows), `linear` and `centering` (how its final network is
    evaluated: eval_and_make_adv.py's --linear and --centering), `save_dir` (None: nothing was
    written) and the names of the checkpoints it saved."""

    final: Checkpoint
    results: dict
    metrics: list[dict]
    linear: bool
    centering: bool
    save_dir: str | None
    saved: dict[str, Checkpoint | None]  # file name -> in memory (None: on disk in save_dir)

    def checkpoint(self, epoch: float, linear: bool | None = None) -> Checkpoint:
        """The checkpoint saved at the start of `epoch` (run_exp.py's
        parameters_checkpoint_{epoch}.pkl, or with `linear` ..._linear_{epoch}.pkl; default:
        linear when the run trained only phase 2)."""
        if linear is None:  # phase 2's when the run saved none of phase 1
            linear = not any(is_phase1_checkpoint(name) for name in self.saved)
        name = checkpoint_name(epoch, linear)
        if name not in self.saved:
            kept = sorted(n for n in self.saved if n.startswith("parameters_checkpoint_"))
            raise UserError(
                f"this run saved no {name} (it has {', '.join(kept) or 'no checkpoints'}; "
                "pass constant_save=True for one per epoch)"
            )
        kept = self.saved[name]
        return kept if kept is not None else load_model(os.path.join(self.save_dir, name))


def is_phase1_checkpoint(name: str) -> bool:
    return name.startswith("parameters_checkpoint_") and "_linear_" not in name


def run_flags(**values: Any) -> dict[str, Any]:
    """run_exp.py's flags for a run given by these values (the others at their defaults), as
    its checkpoints record them."""
    unknown = sorted(set(values) - set(RUN_FLAGS))
    if unknown:
        raise TypeError(f"not a flag of run_exp.py: {', '.join(unknown)}")
    flags = {**RUN_FLAGS, "compile_cache": default_compile_cache(), "no_compile_cache": False}
    return {**flags, **values}


def run(
    ds: Dataset,
    *,
    model: str = DEFAULT_MODEL,
    base: Checkpoint | None = None,
    loaders: str = "CC",
    eps: float = eps_from_255(DEFAULT_EPS_255),
    standard_epochs: int = 100,
    linear_epochs: int = 100,
    seed: int = 0,
    centering: bool = False,
    second_lr: float = 0.01,
    loose_bn_second: bool = False,
    do_standard_second: bool = False,
    skip_first_test: bool = False,
    skip_second_test: bool = False,
    constant_save: bool = False,
    constant_save_linear: bool = False,
    save_models: bool = False,
    save_dir: str | None = None,
    batch_size: int = 128,
    pure_pgd: bool = False,
    n_test: int | None = None,
    resume: bool = False,
    flags: dict[str, Any] | None = None,
    command: list[str] | None = None,
) -> Run:
    """run_exp.py's run with these values (its flags of the same names; `eps` in image units,
    `base` the checkpoint of --base_model_path, `save_dir` --save_path, `seed` --random_seed).
    Phase 1 (skipped with `base`, which is theta_t), its test, phase 2, its test. `flags`: what
    the checkpoints record (default: run_flags of these values); `command`: the command line
    the folder's lock names."""
    use_default_compile_cache()
    if len(loaders) != 2 or any(letter not in "CAF" for letter in loaders):
        raise UserError(f"--loaders {loaders!r} must be two letters of C, A, F (e.g. CC, AC, CA)")
    if base is not None:
        model = base.model_name
        if base.dataset != ds.name:
            raise UserError(
                f"{base.path or 'the base checkpoint'} is a checkpoint of --dataset "
                f"{base.dataset}, not {ds.name}; pass that dataset"
            )
    if flags is None:
        flags = run_flags(
            model=model, dataset=ds.name, loaders=loaders, eps=eps * 255,
            standard_epochs=standard_epochs, linear_epochs=linear_epochs, random_seed=seed,
            centering=centering, second_lr=second_lr, loose_bn_second=loose_bn_second,
            do_standard_second=do_standard_second, skip_first_test=skip_first_test,
            skip_second_test=skip_second_test, constant_save=constant_save,
            constant_save_linear=constant_save_linear, save_models=save_models,
            batch_size=batch_size, pure_pgd=pure_pgd, n_test=n_test,
            base_model_path="" if base is None else (base.path or ""),
        )  # fmt: skip
    if len(ds.x_train) < batch_size:
        raise UserError(f"--batch_size {batch_size} exceeds the {len(ds.x_train)} training images")
    if save_dir is not None:
        try:
            os.makedirs(save_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --save_path {save_dir}: {err.strerror}") from None
        if not os.access(save_dir, os.W_OK):
            raise UserError(f"--save_path {save_dir} is not writable")
    experiment = _Experiment(
        ds=ds, network=base.model if base is not None else get_model(model, ds.n_classes),
        flags=flags, eps=eps, seed=seed, loaders=loaders, batch_size=batch_size,
        pure_pgd=pure_pgd, n_test=n_test, save_dir=save_dir, constant_save=constant_save,
        constant_save_linear=constant_save_linear, save_models=save_models,
        skip_first_test=skip_first_test, skip_second_test=skip_second_test,
        phase2_dynamics=Dynamics(linear=not do_standard_second, centering=centering,
                                 bn_train=loose_bn_second),
        standard_epochs=standard_epochs, linear_epochs=linear_epochs,
        continues_phase1_optimizer=do_standard_second and base is None,
        second_lr=second_lr,
    )  # fmt: skip
    # one run at a time per folder: a second one is refused, naming the first
    writes = is_writer() and save_dir is not None
    lock = folder_lock(save_dir, "--save_path", command, enabled=writes)
    try:
        with lock:
            return experiment.train_and_test(base, resume)
    except KeyboardInterrupt as err:
        err.position = experiment.position  # where it stopped, for the line Ctrl-C prints
        raise


def phase1(
    ds: Dataset,
    *,
    model: str = DEFAULT_MODEL,
    adversarial: bool = False,
    eps: float = eps_from_255(DEFAULT_EPS_255),
    epochs: int = 100,
    seed: int = 0,
    save_dir: str | None = None,
    loader: str | None = None,
    batch_size: int = 128,
    pure_pgd: bool = False,
    constant_save: bool = True,
    test: bool = True,
    n_test: int | None = None,
    resume: bool = False,
) -> Run:
    """Phase 1 alone: `model` trained for `epochs` epochs from the initialisation drawn with
    `seed`, on clean data or (`adversarial`) with L-inf PGD examples of radius `eps` (image
    units) made against the model, the original's two updates per batch (`pure_pgd`: one);
    `loader` C, A or F instead of `adversarial`. With `constant_save` a checkpoint at the start
    of every epoch and at the fractional epochs; `test`: clean, PGD-Linf and PGD-L2 accuracy
    after it. run_exp.py --loaders <A|C>C --linear_epochs 0 --save_models --constant_save."""
    letter = loader or ("A" if adversarial else "C")
    return run(
        ds, model=model, loaders=letter + "C", eps=eps, standard_epochs=epochs, linear_epochs=0,
        seed=seed, constant_save=constant_save, save_models=True, save_dir=save_dir,
        batch_size=batch_size, pure_pgd=pure_pgd, n_test=n_test, skip_first_test=not test,
        skip_second_test=not test, resume=resume,
    )  # fmt: skip


def phase2(
    theta: Checkpoint | Run,
    ds: Dataset,
    *,
    centering: bool = False,
    adversarial: bool = False,
    lr: float = 0.01,
    epochs: int = 100,
    seed: int = 0,
    save_dir: str | None = None,
    eps: float | None = None,
    standard: bool = False,
    loose_bn: bool = False,
    loader: str | None = None,
    batch_size: int = 128,
    pure_pgd: bool = False,
    constant_save: bool = False,
    test: bool = True,
    n_test: int | None = None,
    resume: bool = False,
) -> Run:
    """Phase 2 alone from theta_t = `theta` (a checkpoint, or a run's final network): w trained
    for `epochs` epochs at learning rate `lr` under linearized dynamics (`centering`: centered;
    `standard`: standard dynamics instead) with BatchNorm frozen (`loose_bn`: trained), on clean
    or (`adversarial`, or `loader` C, A, F) PGD data of L-inf radius `eps` (image units; default:
    the radius theta's run was trained and tested at, as its meta records it, else 4/255), the
    radius of its tests too. `test`: theta_t's accuracies first (as
    results['standard']), then the trained model's. `constant_save`: a checkpoint per epoch.
    run_exp.py --base_model_path <theta's file> --loaders ?<A|C> --save_models."""
    if isinstance(theta, Run):
        theta = theta.final
    letter = loader or ("A" if adversarial else "C")
    theta_flags = (theta.meta or {}).get("flags") or {}
    # the phase-1 letter only names theta's own data in the record (run_exp.py ignores it here)
    first = str(theta_flags.get("loaders", "C"))[:1] or "C"
    if eps is None:
        eps = eps_from_255(float(theta_flags.get("eps", DEFAULT_EPS_255)))
    return run(
        ds, base=theta, loaders=first + letter, eps=eps, linear_epochs=epochs, seed=seed,
        centering=centering, second_lr=lr, loose_bn_second=loose_bn, do_standard_second=standard,
        constant_save_linear=constant_save, save_models=True, save_dir=save_dir,
        batch_size=batch_size, pure_pgd=pure_pgd, n_test=n_test, skip_first_test=not test,
        skip_second_test=not test, resume=resume,
    )  # fmt: skip


def format_results(name: str, results: dict | None) -> str:
    if results is None:
        return f"{name}: not evaluated"
    return f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items())


@dataclasses.dataclass
class _Experiment:
    """One run's settings and what its phases share: the data, the network, the keys drawn
    from the seed, the metrics log, the checkpoints saved and where training is."""

    ds: Dataset
    network: hk.TransformedWithState
    flags: dict
    eps: float
    seed: int
    loaders: str
    batch_size: int
    pure_pgd: bool
    n_test: int | None
    save_dir: str | None
    constant_save: bool
    constant_save_linear: bool
    save_models: bool
    skip_first_test: bool
    skip_second_test: bool
    phase2_dynamics: Dynamics
    standard_epochs: int
    linear_epochs: int
    continues_phase1_optimizer: bool
    second_lr: float

    def __post_init__(self):
        self.init_key, self.train_key, self.eval_key = jax.random.split(
            jax.random.PRNGKey(self.seed), 3
        )
        self.steps_per_epoch = num_batches(len(self.ds.x_train), self.batch_size)
        self.x_test = self.ds.x_test[: self.n_test]
        self.y_test = self.ds.y_test[: self.n_test]
        self.position = Position()
        self.saved: dict[str, Checkpoint | None] = {}
        self.run_name = run_of_folder(self.save_dir or ".")
        self.log: TrainingLog | None = None
        # the flags an interrupted run and its resume must agree on, by name
        self.resume_config = {name: self.flags[name] for name in RESUME_CONFIG}

    def path(self, name: str) -> str | None:
        return None if self.save_dir is None else os.path.join(self.save_dir, name)

    # ------------------------------------------------------------------------- the run

    def train_and_test(self, base: Checkpoint | None, resume: bool) -> Run:
        """Phase 1 (or `base`, or the resume point), phase 2, results.pkl."""
        record = None
        if resume and self.save_dir is not None:
            record = load_resume_state(
                self.save_dir, self.resume_config,
                {name: RUN_FLAGS[name] for name in RESUME_CONFIG},
                {1: self.standard_epochs, 2: self.linear_epochs},
                lambda record, path: check_resume_shapes(
                    record, path, self.network, self.ds.image_shape
                ),
            )  # fmt: skip
            if record is not None:
                self.position.saved = (record["phase"], record["epoch"])
        resume_at = None if record is None else (record["phase"], record["epoch"])
        self.log = TrainingLog(self.path(METRICS_FILE), resume_at)
        results = (
            record["results"]
            if record is not None
            else {
                "standard": None,
                "linear": None,
                "standard_second": not self.phase2_dynamics.linear,
            }  # fmt: skip
        )
        if record is not None and record["phase"] == 2:
            self.announce_phase2_optimizer()
            state, start_epoch = restore_train_state(record), record["epoch"]
        else:
            if base is not None:
                print(f"loaded theta_t from {base.path}; skipping phase 1")
                end = TrainState(base.params, None, base.net_state, None)
                end_epoch = checkpoint_epoch(base.meta, base.path or "")
            else:
                end, end_epoch = self.phase1(record, results), self.standard_epochs
            self.announce_phase2_optimizer()
            state, start_epoch = self.start_phase2(end, results, end_epoch), 0
        print(format_results("phase 1 (standard dynamics) test accuracy", results["standard"]))
        final = self.phase2(state, start_epoch, results)
        results = check_results(to_numpy(results), self.path(RESULTS_FILE) or RESULTS_FILE)
        if self.save_dir is not None:
            save_pickle(results, self.path(RESULTS_FILE))
            self.draw_curves()
            print(f"wrote {RESULTS_FILE}, {METRICS_FILE} and {CURVES_FILE} into {self.save_dir}")
        # the final network is phase 2's, unless phase 2 ran 0 epochs after phase 1
        phase2_model = not (self.linear_epochs == 0 and self.standard_epochs > 0)
        dynamics = self.phase2_dynamics if phase2_model else Dynamics()
        return Run(final, results, self.log.rows, dynamics.linear, dynamics.centering,
                   self.save_dir, self.saved)  # fmt: skip

    # ------------------------------------------------------------------------- checkpoints

    def save(
        self, name: str, params, lin_params, net_state, meta: dict, keep: bool = True
    ) -> Checkpoint:
        """Checkpoint `name` as host arrays; with `keep`, saved: written into save_dir, or
        without one kept in memory for Run.checkpoint."""
        params, lin_params, net_state = to_numpy((params, lin_params, net_state))
        path = self.path(name) if keep else None
        if path is not None:
            save_checkpoint(path, params, lin_params, net_state, meta)
        checkpoint = Checkpoint(self.network, meta["model"], meta["dataset"], params,
                                lin_params, net_state, meta, path)  # fmt: skip
        if keep:
            self.saved[name] = None if path is not None else checkpoint
        return checkpoint

    def meta(self, phase: int, epoch: float, step: int | None) -> dict:
        return checkpoint_meta(self.flags, self.run_name, phase, epoch, step)

    # ------------------------------------------------------------------------- phases

    def train_phase(
        self, dynamics, state, *, phase, start_epoch, epochs, loader, lr_for_epoch, key,
        save_hook, results, adversarial_dynamics=None,
    ) -> TrainState:  # fmt: skip
        """Train epochs start_epoch + 1 .. epochs of `phase` from the TrainState `state` with
        loader letter `loader`, saving the resume state after each (with a save_dir)."""
        optimizer = make_optimizer(lr_for_epoch(1))
        steps = {}
        for epoch in range(start_epoch + 1, epochs + 1):
            adversarial = is_adversarial_epoch(loader, epoch)
            if adversarial not in steps:
                steps[adversarial] = make_train_step(
                    self.network, optimizer, dynamics, adversarial=adversarial, eps=self.eps,
                    pure_pgd=self.pure_pgd, adversarial_dynamics=adversarial_dynamics,
                )  # fmt: skip
            set_learning_rate(state, lr_for_epoch(epoch))
            self.position.at = (phase, epoch, 0)
            save_hook(epoch, None, lambda state=state: state)
            start = time.time()

            def before_step(i: int, get_state: Callable, epoch: int = epoch) -> None:
                self.position.at = (phase, epoch, i)
                save_hook(epoch, i, get_state)

            state, metrics = run_epoch(
                steps[adversarial], state, self.ds.x_train, self.ds.y_train,
                batch_size=self.batch_size, seed=(self.seed, phase, epoch),
                key=jax.random.fold_in(key, epoch),
                description=f"phase {phase} epoch {epoch}/{epochs}", on_step=before_step,
            )  # fmt: skip
            if self.save_dir is not None:
                save_resume_state(self.save_dir, self.resume_config, phase, epoch, state, results)
                self.position.saved = (phase, epoch)
            self.log.epoch(
                phase, epoch, adversarial, lr_for_epoch(epoch), metrics, time.time() - start
            )
            tqdm.write(
                f"phase {phase} epoch {epoch}/{epochs} {'adv' if adversarial else 'clean'} "
                f"lr {lr_for_epoch(epoch):g} loss {metrics['loss']:.4f} "
                f"train acc {metrics['accuracy']:.4f} ({time.time() - start:.1f}s)"
            )
        if phase == 1 and epochs > start_epoch and self.linear_epochs > 0:
            # phase 1's curves while phase 2 trains (the run's end draws them all again)
            self.draw_curves()
        return state

    def draw_curves(self) -> None:
        """training_curves.png from metrics.csv, beside it (with a save_dir)."""
        if self.save_dir is not None and self.log.rows:
            flags = self.flags
            title = f"training curves of {os.path.basename(os.path.abspath(self.save_dir))}: "
            title += f"{flags['model']} on {flags['dataset']}, --loaders {flags['loaders']}, "
            title += f"eps {flags['eps']:g}/255"
            plot_training_curves(self.log.numeric(), title, self.path(CURVES_FILE))

    def phase1(self, record: dict | None, results: dict) -> TrainState:
        """Phase 1: standard dynamics, SGD on the original's schedule, from the initialisation
        drawn with the seed (or from an interrupted phase 1); with constant_save a checkpoint
        before each epoch and at the original's fractional epochs. Returns its final state
        (w = theta_t, the network it ends at)."""
        params, net_state = init_model(self.network, self.init_key, self.ds.image_shape)
        spe = self.steps_per_epoch
        fractions = fractional_saves(spe)
        # as in the original, phase-1 checkpoints keep lin_params at the initial parameters
        init_params = jax.tree.map(np.array, params)  # a copy: params' buffers are donated

        def save_phase1(epoch, step, get_state):
            if not self.constant_save:
                return
            if step is None:
                saves = [(epoch - 1, (epoch - 1) * spe)]
            else:
                saves = [(f, (epoch - 1) * spe + step) for f in fractions.get((epoch, step), [])]
            for at_epoch, at_step in saves:
                state = get_state()
                self.save(checkpoint_name(at_epoch), state.w, init_params, state.net_state,
                          self.meta(1, at_epoch, at_step))  # fmt: skip

        start = (
            init_train_state(
                make_optimizer(phase1_learning_rate(1, PHASE1_LR)), params, None, net_state
            )
            if record is None
            else restore_train_state(record)
        )
        return self.train_phase(
            PHASE1, start, phase=1, start_epoch=0 if record is None else record["epoch"],
            epochs=self.standard_epochs, loader=self.loaders[0],
            lr_for_epoch=lambda e: phase1_learning_rate(e, PHASE1_LR),
            key=jax.random.fold_in(self.train_key, 1), save_hook=save_phase1, results=results,
        )  # fmt: skip

    def phase2_learning_rate(self) -> float:
        if self.continues_phase1_optimizer:
            return phase1_learning_rate(self.standard_epochs + 1, PHASE1_LR)
        return self.second_lr

    def announce_phase2_optimizer(self) -> None:
        if self.continues_phase1_optimizer:
            print(
                "--do_standard_second continues phase 1's optimizer (lr "
                f"{self.phase2_learning_rate():g}, momentum kept), as the original does; "
                "--second_lr applies with --base_model_path"
            )

    def start_phase2(self, end: TrainState, results: dict, end_epoch: float | None) -> TrainState:
        """Test the phase-1 network `end` (theta_t), then phase 2's starting state: w = theta_t,
        and SGD(second_lr), or, as in the original, with do_standard_second after phase 1,
        phase 1's optimizer continued (its last learning rate and momentum)."""
        params, net_state = end.w, end.net_state
        if not self.skip_first_test:
            results["standard"] = evaluate(
                self.network, PHASE1, params, None, net_state, self.x_test, self.y_test,
                self.eval_key, eps_linf=self.eps, description="evaluate phase 1",
            )  # fmt: skip
            self.log.test(1, end_epoch, results["standard"])
        theta_t = jax.tree.map(jnp.asarray, params)
        w = jax.tree.map(jnp.copy, theta_t)  # a separate buffer: w is donated at each step
        state = init_train_state(
            make_optimizer(self.phase2_learning_rate()),
            w,
            theta_t,
            jax.tree.map(jnp.asarray, net_state),
        )
        if self.continues_phase1_optimizer:
            state = state._replace(opt_state=end.opt_state)
        if self.save_dir is not None:
            save_resume_state(self.save_dir, self.resume_config, 2, 0, state, results)
            self.position.saved = (2, 0)
        return state

    def phase2(self, state: TrainState, start_epoch: int, results: dict) -> Checkpoint:
        """Phase 2: train w from theta_t under phase2_dynamics; with constant_save_linear a
        checkpoint per epoch; then test it. Returns the final checkpoint (parameters_final.pkl,
        written with save_models)."""
        dynamics = self.phase2_dynamics
        spe = self.steps_per_epoch
        standard_second = not dynamics.linear

        def save(
            name: str, state: TrainState, epoch: float, step: int, keep: bool = True
        ) -> Checkpoint:
            # the original trains `params` under --do_standard_second (lin_params = theta_t,
            # the centering reference) and `lin_params` under linearized dynamics (params =
            # theta_t)
            w, theta_t = state.w, state.theta_t
            params, lin_params = (w, theta_t) if standard_second else (theta_t, w)
            meta = self.meta(2, epoch, step)
            return self.save(name, params, lin_params, state.net_state, meta, keep)

        def save_phase2(epoch, step, get_state):
            # the original rewrites this file before every step of the epoch: what stays is the
            # state before the epoch's last step
            if self.constant_save_linear and step == spe - 1:
                save(checkpoint_name(epoch - 1, linear=True), get_state(), epoch - 1,
                     (epoch - 1) * spe + step)  # fmt: skip

        state = self.train_phase(
            dynamics, state, phase=2, start_epoch=start_epoch, epochs=self.linear_epochs,
            loader=self.loaders[1], lr_for_epoch=lambda e: self.phase2_learning_rate(),
            key=jax.random.fold_in(self.train_key, 2), save_hook=save_phase2, results=results,
            # the original makes phase 2's update on PGD examples with BatchNorm in inference
            # mode
            adversarial_dynamics=dynamics._replace(bn_train=False),
        )  # fmt: skip
        if not self.skip_second_test:
            if self.linear_epochs == 0 and not dynamics.centering and results["standard"]:
                # w = theta_t: the phase-2 model is exactly the phase-1 model.
                print("phase 2 ran 0 epochs: its model equals the phase-1 model; results copied")
                results["linear"] = dict(results["standard"])
            else:
                results["linear"] = evaluate(
                    self.network, dynamics, state.w, state.theta_t, state.net_state, self.x_test,
                    self.y_test, self.eval_key, eps_linf=self.eps, description="evaluate phase 2",
                )  # fmt: skip
            self.log.test(2, self.linear_epochs, results["linear"])
            print(format_results("phase 2 test accuracy", results["linear"]))
        name = "parameters_final.pkl"
        if self.linear_epochs == 0 and self.standard_epochs > 0:
            # no phase 2 ran: the model is phase 1's last, and its meta says so (a kernel of it
            # must not read as epoch 0, the initialisation's)
            meta = self.meta(1, self.standard_epochs, self.standard_epochs * spe)
            return self.save(name, state.w, state.theta_t, state.net_state, meta, self.save_models)
        return save(name, state, self.linear_epochs, self.linear_epochs * spe, self.save_models)


# ----------------------------------------------------------------------------- resuming


def check_resume_shapes(
    record: dict, path: str, model: hk.TransformedWithState, image_shape: tuple[int, ...]
) -> None:
    """The resume state's trees against the network and its optimizer: the same leaves and
    shapes (check_resume_state checked their types and values)."""
    params, net_state = jax.eval_shape(
        lambda: init_model(model, jax.random.PRNGKey(0), image_shape)
    )
    where = f"--resume: {path}"
    check_tree_matches(record["w"], params, f"{where} [w]", RESUME_TODO)
    if record["theta_t"] is not None:
        check_tree_matches(record["theta_t"], params, f"{where} [theta_t]", RESUME_TODO)
    if record["phase"] == 2 and record["theta_t"] is None:
        raise UserError(f"{path}: phase 2 without theta_t ({RESUME_TODO})")
    check_tree_matches(record["net_state"], net_state, f"{where} [net_state]", RESUME_TODO)
    if record["opt_state_leaves"] is not None:
        opt_state = jax.eval_shape(make_optimizer(0.0).init, params)
        wanted = [np.shape(leaf) for leaf in jax.tree.leaves(opt_state)]
        got = [np.shape(leaf) for leaf in record["opt_state_leaves"]]
        if got != wanted:
            raise UserError(
                f"{path}: its optimizer state has {len(got)} arrays that do not fit the network's "
                f"{len(wanted)} ({RESUME_TODO})"
            )


def restore_train_state(record: dict) -> TrainState:
    """The TrainState saved by save_resume_state (the optimizer state's tree structure does not
    depend on the learning rate)."""
    w = jax.tree.map(jnp.asarray, record["w"])
    opt_state = make_optimizer(0.0).init(w)
    if record["opt_state_leaves"] is not None:
        leaves = [jnp.asarray(leaf) for leaf in record["opt_state_leaves"]]
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
    theta_t = None if record["theta_t"] is None else jax.tree.map(jnp.asarray, record["theta_t"])
    return TrainState(w, theta_t, jax.tree.map(jnp.asarray, record["net_state"]), opt_state)
