"""Evaluation: clean accuracy and accuracy under the evaluation attacks (SPEC):
L-inf PGD, 100 steps of 2*eps/100, random start; L2 PGD, eps 0.25, 100 steps of 0.01.
BatchNorm runs in inference mode. Test batches of 100.

Added: `margin`, the L-inf PGD above on the Carlini-Wagner margin loss instead of the
cross-entropy; random restarts for every attack; and the worst case, the fraction of examples
classified correctly on the clean image and under every attack.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from attacks import EVAL_PGD_STEPS, L2_EPS, L2_STEP, pgd_restarts
from data import load_examples, padded_batches
from dynamics import Dynamics, components, forward
from parallel import replicate, shard_batch, to_host
from utils import UserError, positive_int

TEST_BATCH = 100


def attack_settings(eps_linf: float) -> dict[str, dict]:
    """PGD settings of the evaluation attacks, by name."""
    return {
        "linf": {
            "norm": "linf",
            "eps": eps_linf,
            "step_size": 2 * eps_linf / EVAL_PGD_STEPS,
            "n_steps": EVAL_PGD_STEPS,
        },
        "l2": {"norm": "l2", "eps": L2_EPS, "step_size": L2_STEP, "n_steps": EVAL_PGD_STEPS},
        "margin": {
            "norm": "linf",
            "eps": eps_linf,
            "step_size": 2 * eps_linf / EVAL_PGD_STEPS,
            "n_steps": EVAL_PGD_STEPS,
            "loss": "margin",
        },
    }


def add_robustness_flags(p) -> None:
    """Flags of the honest robustness evaluation (eval_and_make_adv.py, ntk_attack.py)."""
    p.add_argument("--margin", action="store_true", help="also PGD on the margin (CW) loss")
    p.add_argument("--restarts", type=positive_int, default=1, help="random restarts per attack")
    p.add_argument(
        "--transfer_path",
        default="",
        help="adv_examples pickle of the same test images (another model's) to transfer",
    )


def attack_key(key: jax.Array, batch: int, attack: int) -> jax.Array:
    """The key of attack number `attack` on test batch `batch`: the first attack keeps the
    original's fold_in(key, batch), so adding attacks leaves its figure unchanged."""
    batch_key = jax.random.fold_in(key, batch)
    return jax.random.fold_in(batch_key, attack) if attack else batch_key


def _nested_key(key: jax.Array, batch: int, attack: int) -> jax.Array:
    """evaluate()'s keys (run_exp.py's end-of-phase tests): fold_in(fold_in(key, batch), attack)
    for every attack, as recorded figures were made with."""
    return jax.random.fold_in(jax.random.fold_in(key, batch), attack)


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
    """The test batches of (x, y) in order (padded to TEST_BATCH and to the device count, split
    over the devices), each with its attacked versions: yields ({'clean': x, name: fn(x, y,
    key_fn(key, batch, j)) for the j-th attack, 'transfer': the matching rows of `transfer`},
    y, number of real rows), under a progress bar."""
    transfer_batches = None if transfer is None else padded_batches(transfer, y, TEST_BATCH)
    bar = tqdm(
        padded_batches(x, y, TEST_BATCH),
        total=-(-len(x) // TEST_BATCH),
        desc=description,
        leave=False,
        disable=None,
    )
    for i, (xb, yb, n_real) in enumerate(bar):
        xb, yb = shard_batch(xb, yb, pad=True)
        inputs = {"clean": xb}
        for j, (name, attack_fn) in enumerate(attack_fns.items()):
            inputs[name] = attack_fn(xb, yb, key_fn(key, i, j))
        if transfer_batches is not None:
            inputs["transfer"] = shard_batch(next(transfer_batches)[0], pad=True)[0]
        yield inputs, yb, n_real
    bar.close()


def load_transfer(path: str, x: np.ndarray, y: np.ndarray, image_shape, trust: bool) -> np.ndarray:
    """Another model's adversarial examples of the test images x (same order and labels)."""
    images, labels = load_examples(path, image_shape, trust)
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
    kind at once (clean and each attack)."""

    def __init__(self):
        self.correct: dict[str, int] = {}
        self.worst = 0
        self.total = 0

    def add(self, hits: dict[str, np.ndarray]) -> None:
        """One batch: a boolean array (n,) of correct predictions per kind, real rows only."""
        for name, h in hits.items():
            self.correct[name] = self.correct.get(name, 0) + int(np.sum(h))
        self.worst += int(np.sum(np.logical_and.reduce(list(hits.values()))))
        self.total += len(next(iter(hits.values())))

    def accuracies(self, worst: bool = True) -> dict[str, float]:
        """Accuracy per kind, and (`worst`) 'worst' when there was more than one kind."""
        result = {name: count / self.total for name, count in self.correct.items()}
        if worst and len(self.correct) > 1:
            result["worst"] = self.worst / self.total
        return result


def make_attack_fn(
    model: hk.TransformedWithState, dynamics: Dynamics, restarts: int = 1, **pgd_kwargs
) -> Callable:
    """Jitted attack(w, theta_t, net_state, x, y, key) -> adversarial x (attacks.pgd_restarts)."""
    dynamics = dynamics._replace(bn_train=False)

    def attack(w, theta_t, net_state, x, y, key):
        def logits_fn(x_in):
            return forward(model, dynamics, w, theta_t, net_state, x_in)[0]

        return pgd_restarts(logits_fn, x, y, key, restarts=restarts, **pgd_kwargs)

    return jax.jit(attack)


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
        x, y, key, attack_fns, description=description, key_fn=_nested_key
    ):
        predictions = {name: logits_fn(w, theta_t, net_state, z) for name, z in inputs.items()}
        tally.add({name: hits(p, yb, n_real) for name, p in predictions.items()})
    return tally.accuracies(worst=False)
