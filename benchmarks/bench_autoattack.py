"""Our AutoAttack (autoattack.py, evaluation.run_autoattack) against the reference, fra31's
AutoAttack (`pyautoattack`), and torchattacks, on the same weights, L-inf and L2, on
one-channel and three-channel models.

Models (`--models`):
- `adversarial`: the demo's adversarially trained cnn_small on digits (8x8x1; run `make demo`
  first);
- `linearized`: the demo's benign centered linearized phase 2 on it (its gradients mislead);
- `colour`: cnn_small trained here for a few epochs on coloured digits (16x16x3: each digit
  upsampled, its strokes and background in random colours per image), so that the three
  channels carry different values.

For each model and threat model (`--norms linf l2`) the same test images are attacked by three
implementations of the standard version, each run as the reference runs it (APGD-CE, APGD-T,
FAB-T, Square in turn, each on the images still robust; 100 iterations, 9 target classes,
5000 queries, p_init 0.8): ours (jitted JAX), the reference's attack objects, and torchattacks'
APGD, APGDT, FAB (multi-targeted) and Square set to the same. The torch model mirrors ours
weight for weight (the linearized model as torch.func.jvp). Printed: the robust accuracy after
each attack and each implementation's time; then Square alone on every image, the figure on
which our L2 Square once fell behind the reference on colour images.

    python benchmarks/bench_autoattack.py                      # all, 100 images
    python benchmarks/bench_autoattack.py --models colour --norms l2 --n_test 200
    python benchmarks/bench_autoattack.py --models --resnet18  # only the ResNet-18 cost
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from bench_ntk import torch_model

from ntk_evolution.attacks import autoattack
from ntk_evolution.attacks.autoattack import AUTOATTACK, AUTOATTACK_FNS
from ntk_evolution.attacks.evaluation import NAMES, after, autoattack_batch, run_autoattack
from ntk_evolution.data import load_dataset
from ntk_evolution.dynamics import Dynamics, forward
from ntk_evolution.io.checkpoints import load_model
from ntk_evolution.models import get_model, init_model

DEMO = {
    "adversarial": "demo_runs/phase1_adversarial/parameters_final.pkl",
    "linearized": "demo_runs/phase2_centered_from_adversarial/parameters_final.pkl",
}
EPS = {  # per model and norm: radii that leave a fair share robust
    ("adversarial", "linf"): 32 / 255,
    ("adversarial", "l2"): 0.5,
    ("linearized", "linf"): 32 / 255,
    ("linearized", "l2"): 0.5,
    ("colour", "linf"): 4 / 255,
    ("colour", "l2"): 0.3,
}
COLOUR_SIDE = 16


def torch_twin(params, net_state, channels: int = 1) -> torch.nn.Module:
    """torch's cnn_small (bench_ntk.torch_model) carrying our parameters and BatchNorm state."""
    net = torch_model("cnn_small", 10, (8, 8, channels))
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for i, (conv, bn) in enumerate(zip(convs, norms, strict=True)):
            conv.weight.copy_(
                torch.from_numpy(np.array(params[f"conv{i}"]["w"])).permute(3, 2, 0, 1)
            )
            bn.weight.copy_(torch.from_numpy(np.array(params[f"bn{i}"]["scale"]).reshape(-1)))
            bn.bias.copy_(torch.from_numpy(np.array(params[f"bn{i}"]["offset"]).reshape(-1)))
            for name, buffer in (("mean", bn.running_mean), ("var", bn.running_var)):
                state = np.asarray(net_state[f"bn{i}/~/{name}_ema"]["average"]).reshape(-1)
                buffer.copy_(torch.from_numpy(state))
        net[-1].weight.copy_(torch.from_numpy(np.array(params["classifier"]["w"]).T))
        net[-1].bias.copy_(torch.from_numpy(np.array(params["classifier"]["b"])))
    return net.eval()


class CenteredLinearized(torch.nn.Module):
    """x -> J(x; theta_t) (w - theta_t) with torch.func.jvp (differentiable in x)."""

    def __init__(self, net_theta: torch.nn.Module, net_w: torch.nn.Module):
        super().__init__()
        self.net = net_theta
        self.theta = {k: v.detach() for k, v in net_theta.named_parameters()}
        w = dict(net_w.named_parameters())
        self.delta = {k: (w[k] - v).detach() for k, v in self.theta.items()}
        self.buffers_ = {k: v.detach() for k, v in net_theta.named_buffers()}

    def forward(self, x):
        from torch.func import functional_call, jvp

        def f(p):
            return functional_call(self.net, (p, self.buffers_), (x,))

        return jvp(f, (self.theta,), (self.delta,))[1]


def coloured_digits(x: np.ndarray, seed: int) -> np.ndarray:
    """Digits (N, 8, 8, 1) upsampled to COLOUR_SIDE and painted: strokes in a random bright
    colour, background in a random dark one, per image."""
    rng = np.random.default_rng(seed)
    factor = COLOUR_SIDE // x.shape[1]
    strokes = np.kron(x[..., 0], np.ones((factor, factor)))[..., None]
    fg = rng.uniform(0.5, 1.0, (len(x), 1, 1, 3))
    bg = rng.uniform(0.0, 0.5, (len(x), 1, 1, 3))
    return (strokes * fg + (1 - strokes) * bg).astype(np.float32)


def train_colour_model(epochs: int = 8, seed: int = 0):
    """cnn_small trained (Adam, cross-entropy, BatchNorm in training mode) on coloured digits;
    returns (model, params, net_state, test images, test labels)."""
    ds = load_dataset("digits")
    x, y = coloured_digits(ds.x_train, seed), ds.y_train
    model = get_model("cnn_small", 10)
    params, net_state = init_model(model, jax.random.PRNGKey(seed), x.shape[1:])
    optimiser = optax.adam(1e-3)
    opt_state = optimiser.init(params)

    @jax.jit
    def step(params, net_state, opt_state, xb, yb):
        def loss_fn(p):
            logits, state = model.apply(p, net_state, xb, True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, state

        (_, net_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(params, updates), net_state, opt_state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - 63, 64):
            rows = order[i : i + 64]
            params, net_state, opt_state = step(params, net_state, opt_state, x[rows], y[rows])
    return model, params, net_state, coloured_digits(ds.x_test, seed + 1), ds.y_test


def reference_cascade(net, x, y, eps, norm, seed: int = 0):
    """The reference's standard version, attack by attack as its run_standard_evaluation runs
    them (its attack objects, configured by its set_version('standard')); returns ({after
    name: robust flags}, {name: seconds})."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(
        net, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", seed=seed
    )
    adversary.fab.targeted, adversary.fab.n_restarts = True, 1
    runs = {
        "apgd_ce": lambda a, b: _with_loss(adversary.apgd, "ce").perturb(a, b),
        "apgd_t": adversary.apgd_targeted.perturb,
        "fab_t": adversary.fab.perturb,
        "square": adversary.square.perturb,
    }
    return _cascade(net, x, y, runs)


def _with_loss(attack, loss):
    attack.loss = loss
    return attack


def torchattacks_cascade(net, x, y, eps, norm):
    """torchattacks' four attacks set to the standard version, in turn on the images still
    robust."""
    import torchattacks

    common = {"norm": {"linf": "Linf", "l2": "L2"}[norm], "eps": eps, "n_restarts": 1, "seed": 0}
    attacks = {
        "apgd_ce": torchattacks.APGD(net, steps=100, loss="ce", **common),
        "apgd_t": torchattacks.APGDT(net, steps=100, n_classes=10, **common),
        "fab_t": torchattacks.FAB(net, steps=100, multi_targeted=True, n_classes=10, **common),
        "square": torchattacks.Square(
            net, n_queries=5000, p_init=0.8, resc_schedule=False, **common
        ),
    }
    return _cascade(net, x, y, attacks)


def _cascade(net, x, y, runs: dict):
    """Each of `runs` (name: fn(x, y) -> adversarial x, torch NCHW) in turn on the images still
    robust (batches of 100), as the reference's run_standard_evaluation does."""
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ty = torch.from_numpy(y).long()
    with torch.no_grad():
        robust = (net(tx).argmax(1) == ty).numpy()
    flags, seconds = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        rows = np.flatnonzero(robust)
        for i in range(0, len(rows), 100):
            batch = rows[i : i + 100]
            adv = run(tx[batch], ty[batch])
            with torch.no_grad():
                fooled = (net(adv).argmax(1) != ty[batch]).numpy()
            robust[batch[fooled]] = False
        seconds[name] = time.perf_counter() - start
        flags[after(name)] = robust.copy()
    return flags, seconds


def ours_cascade(logits_fn, x, y, eps, norm):
    """run_autoattack with our attacks jitted on the model, after one compiling call each."""
    fns = {
        name: jax.jit(functools.partial(fn, logits_fn, eps=eps, norm=norm, n_classes=10))
        for name, fn in AUTOATTACK_FNS.items()
    }
    jit_logits = jax.jit(logits_fn)
    batch = min(autoattack_batch(), len(x))
    start = time.perf_counter()
    for fn in fns.values():  # compile
        jax.block_until_ready(
            fn(jnp.asarray(x[:batch]), jnp.asarray(y[:batch]), jax.random.PRNGKey(0))
        )
    compile_s = time.perf_counter() - start
    correct = np.asarray(jnp.argmax(jit_logits(jnp.asarray(x)), -1)) == y
    start = time.perf_counter()
    flags, checks = run_autoattack(fns, jit_logits, x, y, correct, jax.random.PRNGKey(0))
    return flags, time.perf_counter() - start, compile_s, checks


def square_alone(logits_fn, net, x, y, eps, norm):
    """Square on every image: robust accuracy and seconds for ours, the reference's and
    torchattacks'."""
    import torchattacks
    from pyautoattack.square import SquareAttack

    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ty = torch.from_numpy(y).long()
    result = {}
    attack = jax.jit(functools.partial(autoattack.square, logits_fn, eps=eps, norm=norm))
    start = time.perf_counter()
    adv = np.concatenate([
        np.asarray(attack(jnp.asarray(x[i : i + 100]), jnp.asarray(y[i : i + 100]),
                          jax.random.PRNGKey(i)))
        for i in range(0, len(x), 100)
    ])  # fmt: skip
    ok = np.asarray(jnp.argmax(logits_fn(jnp.asarray(adv)), -1)) == y
    result["ours"] = (ok.mean(), time.perf_counter() - start)
    torch_norm = {"linf": "Linf", "l2": "L2"}[norm]
    peers = {
        "reference": SquareAttack(net, norm=torch_norm, n_queries=5000, eps=eps, p_init=0.8,
                                  seed=0, resc_schedule=False).perturb,
        "torchattacks": torchattacks.Square(net, norm=torch_norm, eps=eps, n_queries=5000,
                                            p_init=0.8, resc_schedule=False, seed=0),
    }  # fmt: skip
    for label, peer in peers.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            adv = torch.cat([peer(tx[i : i + 100], ty[i : i + 100])
                             for i in range(0, len(x), 100)])  # fmt: skip
            ok = (net(adv).argmax(1) == ty).numpy()
        result[label] = (ok.mean(), time.perf_counter() - start)
    return result


def compare(label: str, logits_fn, net, x, y, norm: str, eps: float) -> dict:
    with torch.no_grad():
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        gap = np.abs(net(tx).numpy() - np.asarray(logits_fn(jnp.asarray(x)))).max()
    print(f"\n### {label}, {norm} eps {eps:.4g} ({len(x)} images; logit gap torch vs ours "
          f"{gap:.1e})\n", flush=True)  # fmt: skip
    ours, ours_s, compile_s, checks = ours_cascade(logits_fn, x, y, eps, norm)
    reference, reference_s = reference_cascade(net, x, y, eps, norm)
    peer, peer_s = torchattacks_cascade(net, x, y, eps, norm)
    print("| robust accuracy after | ours | reference (pyautoattack) | torchattacks |")
    print("|---|---|---|---|")
    for name in AUTOATTACK:
        key = after(name)
        print(f"| {NAMES[name]} | {ours[key].mean():.4f} | {reference[key].mean():.4f} | "
              f"{peer[key].mean():.4f} |")  # fmt: skip
    print(f"| seconds (ours: after {compile_s:.0f} s compiling) | {ours_s:.1f} | "
          f"{sum(reference_s.values()):.1f} | {sum(peer_s.values()):.1f} |")  # fmt: skip
    square = square_alone(logits_fn, net, x, y, eps, norm)
    print("\n| Square alone, on every image | ours | reference | torchattacks |")
    print("|---|---|---|---|")
    print("| robust accuracy | " + " | ".join(f"{square[k][0]:.4f}" for k in square) + " |")
    print("| seconds | " + " | ".join(f"{square[k][1]:.1f}" for k in square) + " |")
    gap_aa = ours[after("square")].mean() - reference[after("square")].mean()
    gap_sq = square["ours"][0] - square["reference"][0]
    print(f"\nours minus the reference: AutoAttack {gap_aa:+.4f}, Square alone {gap_sq:+.4f} "
          f"({'no weaker' if max(gap_aa, gap_sq) <= 0.01 else 'WEAKER'} within 1% of the "
          f"images); ours/reference time {ours_s / sum(reference_s.values()):.2f}; zero "
          f"gradients {checks['zero_gradients']} of {checks['zero_gradient_of']}")  # fmt: skip
    return {"autoattack": gap_aa, "square": gap_sq}


def demo_model(which: str):
    """(logits_fn, torch twin) of one of the demo's checkpoints."""
    path = DEMO[which]
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: run `make demo` first")
    loaded = load_model(path, "cnn_small", "digits")
    model, params, lin_params, net_state = (
        loaded.model, loaded.params, loaded.lin_params, loaded.net_state
    )  # fmt: skip
    if which == "linearized":
        dynamics, w, theta_t = Dynamics(linear=True, centering=True), lin_params, params
        net = CenteredLinearized(torch_twin(params, net_state), torch_twin(lin_params, net_state))
        net = net.eval()  # torchattacks restores the mode it finds: keep BatchNorm frozen
    else:
        dynamics, w, theta_t = Dynamics(), params, lin_params
        net = torch_twin(params, net_state)

    def logits_fn(z):
        return forward(model, dynamics, w, theta_t, net_state, z)[0]

    return logits_fn, net


def resnet18_cost(batch: int) -> None:
    """Seconds of each of our attacks on a batch of random 32x32x3 images against ResNet-18 (a
    random classifier layer: at initialisation ours is zero), from reduced iteration counts,
    scaled linearly to the standard ones (no early stop: the worst case, a robust model)."""
    model = get_model("resnet18", 10)
    params, net_state = init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
    params["classifier"]["w"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (512, 10))
    x = jax.random.uniform(jax.random.PRNGKey(2), (batch, 32, 32, 3))

    def logits_fn(z):
        return model.apply(params, net_state, z, False)[0]

    y = jnp.argmax(logits_fn(x), -1)
    eps = 8 / 255
    key, target = jax.random.PRNGKey(0), (y + 1) % 10
    apgd, fab, square = autoattack.apgd, autoattack.fab, autoattack.square
    reduced = {  # name: (attack at reduced iterations, those iterations, the standard number)
        "apgd_ce": (lambda: apgd(logits_fn, x, y, key, eps=eps, n_iter=10)[0], 10, 100),
        "apgd_t (9 targets)": (
            lambda: apgd(logits_fn, x, y, key, eps=eps, loss="dlr_t", target=target, n_iter=10)[0],
            10,
            900,
        ),
        "fab_t (9 targets)": (lambda: fab(logits_fn, x, y, target, eps=eps, n_iter=10)[0], 10, 900),
        "square": (lambda: square(logits_fn, x, y, key, eps=eps, n_queries=100), 100, 5000),
    }
    print(f"\nResNet-18, batch {batch} of 32x32x3, L-inf eps 8/255 (this CPU):")
    print("| attack | iterations timed | s per iteration | standard iterations | s, scaled |")
    print("|---|---|---|---|---|")
    total = 0.0
    for name, (fn, timed, standard) in reduced.items():
        jitted = jax.jit(fn)
        jitted().block_until_ready()
        start = time.perf_counter()
        jitted().block_until_ready()
        per = (time.perf_counter() - start) / timed
        total += per * standard
        print(f"| {name} | {timed} | {per:.3f} | {standard} | {per * standard:.0f} |")
    print(
        f"--autoattack on ResNet-18: about {total:.0f} s per batch of {batch} of robust images "
        "(every attack runs to its end; the cascade spares the images an earlier attack fools)"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument(
        "--models", nargs="*", default=["adversarial", "linearized", "colour"],
        choices=["adversarial", "linearized", "colour"],
    )  # fmt: skip
    p.add_argument("--norms", nargs="+", default=["linf", "l2"], choices=["linf", "l2"])
    p.add_argument("--resnet18", action="store_true", help="also time the attacks on ResNet-18")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    warnings.filterwarnings("ignore", module="torchattacks")
    ds = load_dataset("digits")
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, {args.n_test} test images")
    for which in args.models:
        if which == "colour":
            model, params, net_state, x, y = train_colour_model()
            net = torch_twin(params, net_state, channels=3)

            def logits_fn(z, model=model, params=params, net_state=net_state):
                return model.apply(params, net_state, z, False)[0]

            label = f"coloured digits {COLOUR_SIDE}x{COLOUR_SIDE}x3, cnn_small trained here"
        else:
            logits_fn, net = demo_model(which)
            x, y = ds.x_test, ds.y_test
            label = {"adversarial": "digits 8x8x1, the demo's adversarially trained cnn_small",
                     "linearized": "digits 8x8x1, the demo's benign centered linearized phase 2"
                     }[which]  # fmt: skip
        x, y = x[: args.n_test], y[: args.n_test]
        for norm in args.norms:
            compare(label, logits_fn, net, x, y, norm, EPS[(which, norm)])
    if args.resnet18:
        resnet18_cost(100)


if __name__ == "__main__":
    main()
