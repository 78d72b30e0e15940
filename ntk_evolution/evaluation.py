"""Evaluation: clean accuracy and accuracy under the evaluation attacks (SPEC):
L-inf PGD, 100 steps of 2*eps/100, random start; L2 PGD, eps 0.25, 100 steps of 0.01.
BatchNorm runs in inference mode. Test batches of 100.

Added: `margin`, the L-inf PGD above on the Carlini-Wagner margin loss instead of the
cross-entropy; random restarts for every attack; AutoAttack's four attacks (autoattack.py);
the worst case, the fraction of examples classified correctly on the clean image and under
every attack; and warnings that name gradient masking when the figures show its signs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from data import padded_batches
from ntk_evolution.attacks import (
    attack_key,
    attack_settings,
    nested_attack_key,
    pgd_restarts,
)
from ntk_evolution.autoattack import ATTACK_FNS, AUTOATTACK, GRADIENT_FREE
from ntk_evolution.checkpoints import load_examples
from ntk_evolution.dynamics import Dynamics, components, forward
from ntk_evolution.parallel import replicate, shard_batch
from utils import UserError, progress_bar, to_host

TEST_BATCH = 100


GRADIENT_ATTACKS = ("dirty", "linf", "margin", "apgd_ce", "apgd_t", "fab_t")
NAMES = {
    "dirty": "PGD-Linf",
    "linf": "PGD-Linf",
    "margin": "PGD-margin",
    "apgd_ce": "APGD-CE",
    "apgd_t": "APGD-T",
    "fab_t": "FAB-T",
    "square": "Square",
}


def masking_warnings(accuracies: dict[str, float]) -> list[str]:
    """Warnings naming gradient masking where a gradient-free attack got a lower accuracy than
    every gradient attack run (its figure is then the one to trust)."""
    gradient = {k: v for k, v in accuracies.items() if k in GRADIENT_ATTACKS and v is not None}
    warnings = []
    for name in GRADIENT_FREE:
        if accuracies.get(name) is None or not gradient:
            continue
        best = min(gradient, key=gradient.get)
        if accuracies[name] < gradient[best]:
            warnings.append(
                f"possible gradient masking: the gradient-free {NAMES[name]} attack leaves "
                f"{accuracies[name]:.4f} robust accuracy, below the strongest gradient attack "
                f"({NAMES[best]}, {gradient[best]:.4f}); trust the worst case, not PGD"
            )
    return warnings


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
    if grey_bound is not None and radii and radii[-1] >= 127.5:
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


def load_transfer(
    path: str, x: np.ndarray, y: np.ndarray, image_shape, n_classes: int, trust: bool
) -> np.ndarray:
    """Another model's adversarial examples of the test images x (same order and labels)."""
    images, labels = load_examples(path, image_shape, n_classes, trust)
    if len(images) != len(x):
        raise UserError(
            f"--transfer_path {path} has {len(images)} examples for {len(x)} test images; "
            f"pass --n_test {len(images)}"
        )
    if not np.array_equal(labels, y):
        raise UserError(f"--transfer_path {path} was not made from these test images (labels)")
    distance = float(np.max(np.abs(images - x))) * 255
    print(f"transfer examples: largest L-inf distance to the test images {distance:.2f}/255")
    return images


def hits(logits: jax.Array, y: np.ndarray, n_real: int) -> np.ndarray:
    """Boolean (n_real,): argmax of the logits equals the label, padding rows dropped."""
    return to_host(jnp.argmax(logits, -1) == y)[:n_real]


class Tally:
    """Correct counts per input kind over batches, plus `worst`: examples correct on every
    kind at once (clean and each attack), and `autoattack`: correct on the clean image and
    under all four AutoAttack attacks, when they were run."""

    def __init__(self):
        self.correct: dict[str, int] = {}
        self.worst = 0
        self.autoattack = 0
        self.total = 0

    def add(self, hits: dict[str, np.ndarray]) -> None:
        """One batch: a boolean array (n,) of correct predictions per kind, real rows only."""
        for name, h in hits.items():
            self.correct[name] = self.correct.get(name, 0) + int(np.sum(h))
        self.worst += int(np.sum(np.logical_and.reduce(list(hits.values()))))
        if set(AUTOATTACK) <= set(hits):
            group = [hits["clean"], *(hits[name] for name in AUTOATTACK)]
            self.autoattack += int(np.sum(np.logical_and.reduce(group)))
        self.total += len(next(iter(hits.values())))

    def accuracies(self, worst: bool = True) -> dict[str, float]:
        """Accuracy per kind, 'autoattack' when its four attacks ran, and (`worst`) 'worst'
        when there was more than one kind."""
        result = {name: count / self.total for name, count in self.correct.items()}
        if set(AUTOATTACK) <= set(self.correct):
            result["autoattack"] = self.autoattack / self.total
        if worst and len(self.correct) > 1:
            result["worst"] = self.worst / self.total
        return result


def _jit_attack(model: hk.TransformedWithState, dynamics: Dynamics, attack: Callable) -> Callable:
    """Jitted fn(w, theta_t, net_state, x, y, key) -> attack(logits_fn, x, y, key), the logits
    those of the model under `dynamics` with BatchNorm in inference mode."""
    dynamics = dynamics._replace(bn_train=False)

    def run(w, theta_t, net_state, x, y, key):
        def logits_fn(x_in):
            return forward(model, dynamics, w, theta_t, net_state, x_in)[0]

        return attack(logits_fn, x, y, key)

    return jax.jit(run)


def make_attack_fn(
    model: hk.TransformedWithState, dynamics: Dynamics, restarts: int = 1, **pgd_kwargs
) -> Callable:
    """Jitted attack(w, theta_t, net_state, x, y, key) -> adversarial x (attacks.pgd_restarts)."""
    return _jit_attack(
        model,
        dynamics,
        lambda logits_fn, x, y, key: pgd_restarts(
            logits_fn, x, y, key, restarts=restarts, **pgd_kwargs
        ),
    )


def make_autoattack_fns(
    model: hk.TransformedWithState, dynamics: Dynamics, *, eps: float, norm: str, n_classes: int
) -> dict[str, Callable]:
    """{name: jitted attack(w, theta_t, net_state, x, y, key)} for AutoAttack's four attacks
    (autoattack.py) in the `norm` ball of radius eps."""
    return {
        name: _jit_attack(
            model,
            dynamics,
            functools.partial(ATTACK_FNS[name], eps=eps, norm=norm, n_classes=n_classes),
        )
        for name in AUTOATTACK
    }


def make_components_fn(model: hk.TransformedWithState, dynamics: Dynamics) -> Callable:
    """Jitted fn(w, theta_t, net_state, x) -> (f, df); see dynamics.components."""
    dynamics = dynamics._replace(bn_train=False)
    return jax.jit(
        lambda w, theta_t, net_state, x: components(model, dynamics, w, theta_t, net_state, x)
    )


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
