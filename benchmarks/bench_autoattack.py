"""Peer check of our AutoAttack (autoattack.py) against torchattacks on the same weights.

For each cnn_small checkpoint (by default the demo's adversarially trained network and its
benign centered linearized phase 2; run `make demo` first), the same test images are attacked
by our four attacks (jitted JAX) and by torchattacks' APGD (CE), APGDT, FAB (multi-targeted)
and Square, set to AutoAttack's standard version (100 iterations, 9 target classes, 5000
queries, p_init 0.8, no schedule rescaling), through a torch model that mirrors ours weight for
weight (the linearized model as torch.func.jvp). Prints each attack's robust accuracy, the
worst case over the four, and the time of both sides (ours: after one warm-up call that
compiles, and the first call's compile overhead separately).

Ours must be no weaker: its worst case no higher than torchattacks' beyond two examples.

    python benchmarks/bench_autoattack.py                  # the demo's two checkpoints, 100 images
    python benchmarks/bench_autoattack.py --n_test 360 --resnet18
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_ntk import torch_model

from data import load_dataset, padded_batches
from models import get_model, init_model
from ntk_evolution import autoattack
from ntk_evolution.attacks import eps_from_255
from ntk_evolution.autoattack import ATTACK_FNS, AUTOATTACK
from ntk_evolution.checkpoints import load_model
from ntk_evolution.dynamics import Dynamics, forward

CHECKPOINTS = {
    "adversarially trained network": ("demo_runs/phase1_adversarial/parameters_final.pkl", False),
    "benign centered linearized phase 2 on it": (
        "demo_runs/phase2_centered_from_adversarial/parameters_final.pkl",
        True,
    ),
}


def torch_twin(params, net_state) -> torch.nn.Module:
    """torch's cnn_small (bench_ntk.torch_model) carrying our parameters and BatchNorm state."""
    net = torch_model("cnn_small", 10, (8, 8, 1))
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


def torch_attacks(net, eps):
    import torchattacks

    common = {"norm": "Linf", "eps": eps, "n_restarts": 1}
    return {
        "apgd_ce": torchattacks.APGD(net, steps=100, loss="ce", **common),
        "apgd_t": torchattacks.APGDT(net, steps=100, n_classes=10, **common),
        "fab_t": torchattacks.FAB(net, steps=100, multi_targeted=True, n_classes=10, **common),
        "square": torchattacks.Square(
            net, n_queries=5000, p_init=0.8, resc_schedule=False, **common
        ),
    }


def compare(label, path, linear, x, y, eps, batch) -> dict:
    loaded = load_model(path, "cnn_small", "digits")
    model, params, lin_params = loaded.model, loaded.params, loaded.lin_params
    net_state = loaded.net_state
    if linear:
        dynamics, w, theta_t = Dynamics(linear=True, centering=True), lin_params, params
        net = CenteredLinearized(torch_twin(params, net_state), torch_twin(lin_params, net_state))
        net = net.eval()  # torchattacks restores the mode it finds: keep BatchNorm frozen
    else:
        dynamics, w, theta_t = Dynamics(), params, lin_params
        net = torch_twin(params, net_state)

    def logits_fn(z):
        return forward(model, dynamics, w, theta_t, net_state, z)[0]

    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ty = torch.from_numpy(y).long()
    with torch.no_grad():
        gap = np.abs(net(tx).numpy() - np.asarray(logits_fn(jnp.asarray(x)))).max()
    print(f"\n{label} ({path}): largest logit gap torch vs ours {gap:.1e}")
    clean = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1)) == y
    rows, ours_all, ours_twin_all, peer_all = [], clean.copy(), clean.copy(), clean.copy()
    peers = torch_attacks(net, eps)
    for name in AUTOATTACK:
        attack = jax.jit(functools.partial(ATTACK_FNS[name], logits_fn, eps=eps, norm="linf"))
        start = time.perf_counter()
        attack(
            jnp.asarray(x[:batch]), jnp.asarray(y[:batch]), jax.random.PRNGKey(0)
        ).block_until_ready()
        first = time.perf_counter() - start
        start = time.perf_counter()
        ours_adv = np.concatenate([  # batches padded to one shape, as the evaluation does
            np.asarray(attack(jnp.asarray(xb), jnp.asarray(yb), jax.random.PRNGKey(i)))[:n]
            for i, (xb, yb, n) in enumerate(padded_batches(x, y, batch))
        ])  # fmt: skip
        ours_time = time.perf_counter() - start
        ours_ok = np.asarray(jnp.argmax(logits_fn(jnp.asarray(ours_adv)), -1)) == y
        with torch.no_grad():  # our examples judged by the torch twin: they fool it too
            twin = torch.from_numpy(ours_adv).permute(0, 3, 1, 2).contiguous()
            ours_on_twin = net(twin).argmax(1).numpy() == y
        start = time.perf_counter()
        peer_adv = torch.cat([peers[name](tx[i : i + batch], ty[i : i + batch])
                              for i in range(0, len(x), batch)])  # fmt: skip
        peer_time = time.perf_counter() - start
        with torch.no_grad():
            peer_ok = net(peer_adv).argmax(1).numpy() == y
        ours_all &= ours_ok
        ours_twin_all &= ours_on_twin
        peer_all &= peer_ok
        rows.append((name, (ours_ok & clean).mean(), (ours_on_twin & clean).mean(),
                     (peer_ok & clean).mean(), ours_time, first - ours_time * batch / len(x),
                     peer_time))  # fmt: skip
    print(
        "| attack | ours robust acc | ours, judged by the torch twin | torchattacks | ours s "
        "| ours compile s | torchattacks s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ours_acc, twin_acc, peer_acc, ours_t, compile_t, peer_t in rows:
        print(
            f"| {name} | {ours_acc:.4f} | {twin_acc:.4f} | {peer_acc:.4f} | {ours_t:.1f} "
            f"| {compile_t:.1f} | {peer_t:.1f} |"
        )
    total_ours, total_peer = sum(r[4] for r in rows), sum(r[6] for r in rows)
    print(
        f"| worst case (AutoAttack) | {ours_all.mean():.4f} | {ours_twin_all.mean():.4f} | "
        f"{peer_all.mean():.4f} | {total_ours:.1f} | {sum(r[5] for r in rows):.1f} | "
        f"{total_peer:.1f} |"
    )
    compile_total = sum(r[5] for r in rows)
    print(
        f"time ours/torchattacks {total_ours / total_peer:.2f} after compilation, "
        f"{(total_ours + compile_total) / total_peer:.2f} including it"
    )
    verdict = "no weaker" if ours_all.sum() <= peer_all.sum() + 2 else "WEAKER"
    print(f"ours is {verdict} (robust {ours_all.sum()} vs {peer_all.sum()} of {len(x)})")
    return {"ours": ours_all.mean(), "torchattacks": peer_all.mean()}


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
        "square": (lambda: square(logits_fn, x, y, key, eps=eps, n_queries=101), 100, 5000),
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
        f"--autoattack on ResNet-18: about {total:.0f} s per batch of {batch} without early stops"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--eps", type=float, default=32.0, help="L-inf radius in 1/255")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--resnet18", action="store_true", help="also time the attacks on ResNet-18")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    ds = load_dataset("digits")
    x, y = ds.x_test[: args.n_test], ds.y_test[: args.n_test]
    print(f"digits, cnn_small, L-inf eps {args.eps:g}/255, {len(x)} test images, "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cores")  # fmt: skip
    for label, (path, linear) in CHECKPOINTS.items():
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: run `make demo` first")
        compare(label, path, linear, x, y, eps_from_255(args.eps), args.batch)
    if args.resnet18:
        resnet18_cost(args.batch)


if __name__ == "__main__":
    main()
