"""Evaluation: clean accuracy and accuracy under the evaluation attacks (SPEC):
L-inf PGD, 100 steps of 2*eps/100, random start; L2 PGD, eps 0.25, 100 steps of 0.01.
BatchNorm runs in inference mode. Test batches of 100.

Added: `margin`, the L-inf PGD above on the Carlini-Wagner margin loss instead of the
cross-entropy; random restarts for every attack; AutoAttack's standard version
(run_autoattack: its four attacks of autoattack.py in turn, each on the examples still robust,
and the reference's checks); the worst case, the fraction of examples classified correctly on
the clean image and under every attack; and warnings that name gradient masking when the
figures show its signs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntk_evolution.attacks.autoattack import AUTOATTACK, AUTOATTACK_FNS
from ntk_evolution.attacks.pgd import (
    attack_key,
    attack_settings,
    eps_from_255,
    nested_attack_key,
    pgd_restarts,
)
from ntk_evolution.data import padded_batches
from ntk_evolution.dynamics import Dynamics, components, forward
from ntk_evolution.parallel import replicate, shard_batch
from ntk_evolution.utils import progress_bar, to_host

TEST_BATCH = 100
AUTOATTACK_CPU_BATCH = 25
AUTOATTACK_KEY = 1_000_003  # folded into the evaluation key: AutoAttack's own stream


NAMES = {
    "dirty": "PGD-Linf",
    "linf": "PGD-Linf",
    "margin": "PGD-margin",
    "apgd_ce": "APGD-CE",
    "apgd_t": "APGD-T",
    "fab_t": "FAB-T",
    "square": "Square",
}
# the reference's checks (auto-attack's checks.py) and their thresholds
SQUARE_ALPHA = 0.002  # check_square_sr: Square may remove at most this share beyond the others
RANDOMNESS_ALPHA = 1e-4  # check_randomized: largest change of the L2-normalised logits
PROBABILITY_ALPHA = 1e-5  # check_range_output: tolerance of "in [0, 1] and summing to 1"
RANDOMNESS_PASSES = 5  # check_randomized: clean passes over the first batch


def after(name: str) -> str:
    """The key of the robust accuracy after AutoAttack's attacks up to `name` (the cascade)."""
    return f"after_{name}"


NAMES.update({after(name): f"after {NAMES[name]}" for name in AUTOATTACK})


def masking_warnings(accuracies: dict[str, float], checks: dict | None = None) -> list[str]:
    """The reference AutoAttack's checks as warnings (auto-attack's checks.py), each with its
    figures: Square removing more than 0.2% of the images beyond what APGD-CE, APGD-T and FAB-T
    leave together (check_square_sr: `accuracies` after FAB-T and after Square); and, from
    run_autoattack's `checks`, inputs whose gradient is exactly zero, a model whose clean
    outputs change between passes, outputs that look like probabilities."""
    warnings = []
    gradient, final = accuracies.get(after("fab_t")), accuracies.get(after("square"))
    if gradient is not None and final is not None and final < gradient - SQUARE_ALPHA:
        warnings.append(
            f"possible gradient masking: the gradient-free Square attack lowers the robust "
            f"accuracy by {gradient - final:.2%} (from {gradient:.4f} after APGD-CE, APGD-T and "
            f"FAB-T together to {final:.4f}; the reference warns above "
            f"{SQUARE_ALPHA:.1%}); trust AutoAttack's figure, not PGD's"
        )
    checks = checks or {}
    zero, attacked = checks.get("zero_gradients", 0), checks.get("zero_gradient_of", 0)
    if zero:
        warnings.append(
            f"possible gradient masking: {zero} of the {attacked} images APGD-CE attacked have an "
            "input gradient of exactly zero where it starts; gradient attacks cannot move there"
        )
    if checks.get("randomness", 0.0) > RANDOMNESS_ALPHA or checks.get("predictions_change"):
        warnings.append(
            f"the model looks randomised: {RANDOMNESS_PASSES} clean passes over the first batch "
            f"differ (largest change of the normalised logits {checks['randomness']:.2g}); "
            "AutoAttack's standard version assumes a deterministic model"
        )
    if checks.get("probabilities"):
        warnings.append(
            "the model's outputs look like probabilities (in [0, 1], summing to 1): the attacks "
            "need logits; a softmax saturates their losses and gradients"
        )
    return warnings


GREY_RADIUS = 0.5  # the L-inf radius whose ball around any image in [0, 1] holds the grey one


def sweep_warnings(sweep: dict[float, float], grey_bound: float | None) -> list[str]:
    """Warnings naming gradient masking where robust accuracy does not fall towards zero as the
    L-inf radius grows: it rises with eps (more than one point), or at eps >= 0.5 (where the
    all-grey image lies in every ball, so a perfect attack leaves at most `grey_bound`, the
    share of examples whose label is the grey image's prediction) it exceeds that bound."""
    warnings = []
    radii = sorted(sweep)
    for small, large in zip(radii, radii[1:], strict=False):
        if sweep[large] > sweep[small] + 0.01:
            warnings.append(
                f"possible gradient masking: robust accuracy rises from {sweep[small]:.4f} at "
                f"eps {small:g}/255 to {sweep[large]:.4f} at eps {large:g}/255"
            )
    if grey_bound is not None and radii and eps_from_255(radii[-1]) >= GREY_RADIUS:
        if sweep[radii[-1]] > grey_bound + 0.01:
            warnings.append(
                f"possible gradient masking: at eps {radii[-1]:g}/255 the all-grey image is in "
                f"every ball, yet {sweep[radii[-1]]:.4f} stays robust (at most {grey_bound:.4f} "
                "can be)"
            )
    return warnings


def print_warnings(warnings: list[str]) -> None:
    for text in warnings:
        print(f"warning: {text}")


def attacked_batches(
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    attack_fns: dict[str, Callable],
    *,
    transfer: np.ndarray | None = None,
    description: str = "evaluate",
    key_fn: Callable[[jax.Array, int, int], jax.Array] = attack_key,
) -> Iterator[tuple[dict[str, jax.Array], jax.Array, int]]:
    """The test batches of (x, y) in order (batches of TEST_BATCH, the last padded to it, or one
    batch of them all when there are fewer; padded to the device count and split over the
    devices), each with its attacked versions: yields ({'clean': x, name: fn(x, y, key_fn(key,
    batch, j)) for the j-th attack, 'transfer': the matching rows of `transfer`}, y, number of
    real rows), under a progress bar."""
    batch = max(1, min(TEST_BATCH, len(x)))  # --n_test 16 attacks 16 images, not 100
    transfer_batches = None if transfer is None else padded_batches(transfer, y, batch)
    bar = progress_bar(padded_batches(x, y, batch), total=-(-len(x) // batch), desc=description)
    for i, (xb, yb, n_real) in enumerate(bar):
        xb, yb = shard_batch(xb, yb, pad=True)
        inputs = {"clean": xb}
        for j, (name, attack_fn) in enumerate(attack_fns.items()):
            inputs[name] = attack_fn(xb, yb, key_fn(key, i, j))
        if transfer_batches is not None:
            inputs["transfer"] = shard_batch(next(transfer_batches)[0], pad=True)[0]
        yield inputs, yb, n_real
    bar.close()


def hits(logits: jax.Array, y: np.ndarray, n_real: int) -> np.ndarray:
    """Boolean (n_real,): argmax of the logits equals the label, padding rows dropped."""
    return to_host(jnp.argmax(logits, -1) == y)[:n_real]


class Tally:
    """Per-example correctness per input kind: add() takes one batch's (or, for AutoAttack's
    cascade, the whole test set's) boolean arrays per kind; accuracies() gives each kind's
    accuracy, 'autoattack' (robust after all four of AutoAttack's attacks) when they ran, and
    'worst' (correct on every kind at once)."""

    def __init__(self):
        self._hits: dict[str, list[np.ndarray]] = {}

    def add(self, hits: dict[str, np.ndarray]) -> None:
        """Boolean arrays of correct predictions per kind, real rows only."""
        for name, h in hits.items():
            self._hits.setdefault(name, []).append(np.asarray(h, bool))

    def flags(self, name: str) -> np.ndarray:
        """Kind `name`'s correctness per example, in test-set order."""
        return np.concatenate(self._hits[name])

    def accuracies(self, worst: bool = True) -> dict[str, float]:
        """Accuracy per kind, 'autoattack' when AutoAttack ran, and (`worst`) 'worst' when there
        was more than one kind."""
        flags = {name: self.flags(name) for name in self._hits}
        result = {name: float(np.mean(f)) for name, f in flags.items()}
        if after(AUTOATTACK[-1]) in flags:
            result["autoattack"] = result[after(AUTOATTACK[-1])]
        if worst and len(flags) > 1:
            result["worst"] = float(np.mean(np.logical_and.reduce(list(flags.values()))))
        return result


def run_autoattack(
    attack_fns: dict[str, Callable],
    logits_fn: Callable[[jax.Array], jax.Array],
    x: np.ndarray,
    y: np.ndarray,
    correct: np.ndarray,
    key: jax.Array,
    *,
    each: bool = False,
) -> tuple[dict[str, np.ndarray], dict]:
    """AutoAttack's standard version as the reference runs it: APGD-CE, APGD-T, FAB-T and Square
    in turn, each on the examples still robust (`correct`: classified correctly on the clean
    image), printing the robust accuracy after each. `attack_fns`: make_autoattack_fns' jitted
    attack(x, y, key) on a device batch, plus its 'zero_gradient' check; `logits_fn(x)` the
    model's logits on one.

    Returns ({after(name): robust after the attacks up to `name`, per example}, checks): with
    `each`, every attack also runs on every example and its own correctness is under `name`
    (the per-attack tables), the cascade's figures following from them. `checks`: the
    reference's checks with their figures: zero_gradients (of zero_gradient_of images attacked
    by APGD-CE), randomness (largest change of the L2-normalised clean logits over
    RANDOMNESS_PASSES passes of the first batch) and predictions_change, probabilities."""
    batch = max(1, min(autoattack_batch(), len(x)))
    aa_key = jax.random.fold_in(key, AUTOATTACK_KEY)
    checks = _output_checks(logits_fn, x[:batch], y[:batch])
    robust, flags = np.asarray(correct, bool).copy(), {}
    started = time.perf_counter()
    for j, name in enumerate(["zero_gradient", *AUTOATTACK]):
        rows = np.arange(len(x)) if each else np.flatnonzero(robust)
        ok = np.ones(len(x), bool)
        bar = progress_bar(
            padded_batches(x[rows], y[rows], batch),
            total=-(-len(rows) // batch),
            desc=NAMES.get(name, "zero-gradient check"),
        )
        for i, (xb, yb, n_real) in enumerate(bar):
            xs, ys = shard_batch(xb, yb, pad=True)
            # the check draws APGD-CE's keys: it looks at the points APGD-CE starts from
            result = attack_fns[name](xs, ys, attack_key(aa_key, i, max(j - 1, 0)))
            taken = rows[i * batch : i * batch + n_real]
            if name == "zero_gradient":
                ok[taken] = ~to_host(result)[:n_real]
            else:
                ok[taken] = hits(logits_fn(result), ys, n_real)
        bar.close()
        if name == "zero_gradient":
            checks.update(zero_gradients=int(np.sum(~ok)), zero_gradient_of=len(rows))
            continue
        if each:
            flags[name] = ok
        robust &= ok
        flags[after(name)] = robust.copy()
        print(
            f"robust accuracy after {NAMES[name]}: {np.mean(robust):.2%} ({np.sum(robust)} of "
            f"{len(x)}; total time {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
    return flags, checks


def autoattack_batch() -> int:
    """The batch of run_autoattack: one compiled shape per attack, shared by every model of
    one architecture, the last batch padded. On CPUs an attack's cost grows with the batch
    in proportion (25 images cost a quarter of 100), so batches of AUTOATTACK_CPU_BATCH waste
    little on padding when few images are left; accelerators take TEST_BATCH."""
    return AUTOATTACK_CPU_BATCH if jax.default_backend() == "cpu" else TEST_BATCH


def _output_checks(logits_fn: Callable, x: np.ndarray, y: np.ndarray) -> dict:
    """The reference's check_randomized and check_range_output on one batch of clean images."""
    (xs,) = shard_batch(x, pad=True)
    outputs = [to_host(logits_fn(xs))[: len(x)] for _ in range(RANDOMNESS_PASSES)]
    unit = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outputs]
    change = max(float(np.max(np.linalg.norm(a - b, axis=1))) for a in unit for b in unit)
    labels = [np.argmax(o, 1) for o in outputs]
    first = outputs[0]
    probabilities = bool(
        first.max() < 1 + PROBABILITY_ALPHA
        and first.min() > -PROBABILITY_ALPHA
        and np.all(np.abs(first.sum(1) - 1) < PROBABILITY_ALPHA)
    )
    return {
        "randomness": change,
        "predictions_change": any(not np.array_equal(labels[0], other) for other in labels),
        "probabilities": probabilities,
    }


def _jit_attack(model: hk.TransformedWithState, dynamics: Dynamics, attack: Callable) -> Callable:
    """Jitted fn(w, theta_t, net_state, x, y, key, budget={}) -> attack(logits_fn, x, y, key,
    **budget), the logits those of the model under `dynamics` with BatchNorm in inference mode;
    `budget` (eps, step size) is an argument, so that other budgets reuse the compilation."""
    dynamics = dynamics._replace(bn_train=False)

    def run(w, theta_t, net_state, x, y, key, budget=None):
        def logits_fn(x_in):
            return forward(model, dynamics, w, theta_t, net_state, x_in)[0]

        return attack(logits_fn, x, y, key, **(budget or {}))

    return jax.jit(run)


PGD_BUDGET = ("eps", "step_size")  # pgd's settings passed as arguments of its compiled attack


def make_attack_fn(
    model: hk.TransformedWithState, dynamics: Dynamics, restarts: int = 1, **pgd_kwargs
) -> Callable:
    """Jitted attack(w, theta_t, net_state, x, y, key) -> adversarial x (attacks.pgd_restarts),
    compiled once per model, dynamics, restarts and the settings other than eps and step size."""
    budget = {name: np.float32(pgd_kwargs.pop(name)) for name in PGD_BUDGET if name in pgd_kwargs}
    compiled = _compiled_pgd(model, dynamics, restarts, **pgd_kwargs)
    return functools.partial(compiled, budget=budget)


@functools.lru_cache(maxsize=32)  # one compilation per model, dynamics and setting
def _compiled_pgd(
    model: hk.TransformedWithState, dynamics: Dynamics, restarts: int, **pgd_kwargs
) -> Callable:
    return _jit_attack(
        model,
        dynamics,
        lambda logits_fn, x, y, key, **budget: pgd_restarts(
            logits_fn, x, y, key, restarts=restarts, **pgd_kwargs, **budget
        ),
    )


def make_autoattack_fns(
    model: hk.TransformedWithState, dynamics: Dynamics, *, eps: float, norm: str, n_classes: int
) -> dict[str, Callable]:
    """{name: jitted attack(w, theta_t, net_state, x, y, key)} for AutoAttack's four attacks
    (autoattack.py) in the `norm` ball of radius eps, and its 'zero_gradient' check; eps is an
    argument of the compiled attacks, so that another radius (--eps_sweep) reuses them."""
    budget = {"eps": np.float32(eps)}
    return {
        name: functools.partial(
            _compiled_autoattack(model, dynamics, name, norm, n_classes), budget=budget
        )
        for name in AUTOATTACK_FNS
    }


@functools.lru_cache(maxsize=32)  # one compilation per model, dynamics, attack and threat model
def _compiled_autoattack(
    model: hk.TransformedWithState, dynamics: Dynamics, name: str, norm: str, n_classes: int
) -> Callable:
    return _jit_attack(
        model, dynamics, functools.partial(AUTOATTACK_FNS[name], norm=norm, n_classes=n_classes)
    )


@functools.lru_cache(maxsize=32)  # one compilation per model, dynamics and setting
def make_components_fn(model: hk.TransformedWithState, dynamics: Dynamics) -> Callable:
    """Jitted fn(w, theta_t, net_state, x) -> (f, df); see dynamics.components."""
    dynamics = dynamics._replace(bn_train=False)
    return jax.jit(
        lambda w, theta_t, net_state, x: components(model, dynamics, w, theta_t, net_state, x)
    )


@functools.lru_cache(maxsize=32)  # one compilation per model, dynamics and setting
def make_logits_fn(model: hk.TransformedWithState, dynamics: Dynamics) -> Callable:
    """Jitted fn(w, theta_t, net_state, x) -> logits, BatchNorm in inference mode."""
    dynamics = dynamics._replace(bn_train=False)
    return jax.jit(
        lambda w, theta_t, net_state, x: forward(model, dynamics, w, theta_t, net_state, x)[0]
    )


def evaluate(
    model: hk.TransformedWithState,
    dynamics: Dynamics,
    w: hk.Params,
    theta_t: hk.Params | None,
    net_state: hk.State,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    eps_linf: float,
    attacks: tuple[str, ...] = ("linf", "l2"),
    restarts: int = 1,
    description: str = "evaluate",
) -> dict[str, float]:
    """Accuracy (fraction) on clean images and under each attack in `attacks` (names of
    attack_settings): results.pkl's {'clean', 'linf', 'l2'} by default."""
    logits_fn = make_logits_fn(model, dynamics)
    w, theta_t, net_state = replicate((w, theta_t, net_state))
    settings = attack_settings(eps_linf)
    attack_fns = {
        name: make_attack_fn(model, dynamics, restarts, **settings[name]) for name in attacks
    }
    attack_fns = {
        name: functools.partial(fn, w, theta_t, net_state) for name, fn in attack_fns.items()
    }
    tally = Tally()
    for inputs, yb, n_real in attacked_batches(
        x, y, key, attack_fns, description=description, key_fn=nested_attack_key
    ):
        predictions = {name: logits_fn(w, theta_t, net_state, z) for name, z in inputs.items()}
        tally.add({name: hits(p, yb, n_real) for name, p in predictions.items()})
    return tally.accuracies(worst=False)
