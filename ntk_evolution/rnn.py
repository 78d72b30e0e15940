"""Recurrent acceptors of binary strings (the Tomita languages): a vanilla, GRU or LSTM cell
reading one-hot symbols from a learned initial state, and a linear readout of its output.

    h_0 = learned,  h_t = cell(h_{t-1}, onehot(s_t)),  logit_t = w . out(h_t) + b

logit_t > 0 says "the prefix s_1..s_t is in the language" (t = 0: the empty string). Training
uses each string's last logit only (binary cross-entropy), as a string classifier is trained;
the prefixes' logits are what automaton extraction reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_evolution.automata import ALPHABET
from utils import progress_bar

CELLS = ("vanilla", "gru", "lstm")


def make_rnn(cell: str, hidden: int) -> hk.Transformed:
    """apply(params, None, tokens (B, T) int) -> (logits (B, T + 1), states (B, T + 1, S)):
    position t is the prefix of length t. S = hidden, or 2 * hidden for the LSTM (its output
    and cell state side by side)."""
    if cell not in CELLS:
        raise ValueError(f"cell {cell!r}: use one of {CELLS}")

    def forward(tokens):
        core = {"vanilla": hk.VanillaRNN, "gru": hk.GRU, "lstm": hk.LSTM}[cell](hidden)
        readout = hk.Linear(1, name="readout")
        batch = tokens.shape[0]
        if cell == "lstm":
            h0 = hk.get_parameter("h0", [hidden], init=jnp.zeros)
            c0 = hk.get_parameter("c0", [hidden], init=jnp.zeros)
            state0 = hk.LSTMState(jnp.tile(h0, (batch, 1)), jnp.tile(c0, (batch, 1)))
        else:
            state0 = jnp.tile(hk.get_parameter("h0", [hidden], init=jnp.zeros), (batch, 1))
        inputs = jax.nn.one_hot(tokens, len(ALPHABET))
        outputs, states = hk.dynamic_unroll(
            core, inputs, state0, time_major=False, return_all_states=True
        )
        if cell == "lstm":
            first = state0.hidden
            flat = jnp.concatenate([states.hidden, states.cell], axis=-1)
            flat0 = jnp.concatenate([state0.hidden, state0.cell], axis=-1)
        else:
            first, flat, flat0 = state0, states, state0
        outputs = jnp.concatenate([first[:, None], outputs], axis=1)  # (B, T + 1, hidden)
        logits = readout(outputs)[..., 0]
        return logits, jnp.concatenate([flat0[:, None], flat], axis=1)

    return hk.transform(forward)


def encode(strings: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T) int32 padded with 0, lengths (B,)) of binary strings."""
    lengths = np.array([len(s) for s in strings], np.int32)
    tokens = np.zeros((len(strings), max(length or 0, lengths.max(initial=0), 1)), np.int32)
    for i, s in enumerate(strings):
        tokens[i, : len(s)] = [ALPHABET.index(c) for c in s]
    return tokens, lengths


@functools.lru_cache(maxsize=8)
def _forward_fn(cell: str, hidden: int):
    return jax.jit(make_rnn(cell, hidden).apply)


def prefix_outputs(params, cell: str, hidden: int, strings: Sequence[str], batch: int = 512):
    """For each string, (logits (len + 1,), states (len + 1, S)) at every prefix, in batches
    of `batch` strings padded to a multiple of 8 symbols (few compiled shapes)."""
    forward = _forward_fn(cell, hidden)
    width = -(-max((len(s) for s in strings), default=1) // 8) * 8  # few compiled widths
    results = []
    for start in range(0, len(strings), batch):
        part = list(strings[start : start + batch])
        tokens, lengths = encode(part + [""] * (batch - len(part)), width)
        logits, states = forward(params, None, tokens)
        logits, states = np.asarray(logits), np.asarray(states)
        results += [
            (logits[i, : n + 1], states[i, : n + 1]) for i, n in enumerate(lengths[: len(part)])
        ]
    return results


def _last_logits(model: hk.Transformed, params, tokens, lengths) -> jax.Array:
    """Each padded string's logit after its last symbol (B,)."""
    logits, _ = model.apply(params, None, tokens)
    return jnp.take_along_axis(logits, lengths[:, None], axis=1)[:, 0]


def train(
    train_data: Sequence[tuple[str, bool]],
    test_data: Sequence[tuple[str, bool]],
    *,
    cell: str = "gru",
    hidden: int = 32,
    lr: float = 3e-3,
    batch_size: int = 64,
    max_epochs: int = 200,
    extra_epochs: int = 0,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int, hk.Params, dict], None] | None = None,
) -> tuple[hk.Params, dict]:
    """Adam on the binary cross-entropy of each string's last logit, until the RNN classifies
    every test string right (checked after each epoch), then `extra_epochs` more (training past
    convergence). Returns the parameters and a history: per epoch loss and train/test accuracy,
    and the epoch of convergence (None if max_epochs passed first). on_epoch(epoch, params,
    history) is called after each epoch's check (e.g. to keep snapshots)."""
    model = make_rnn(cell, hidden)
    width = max(len(s) for s, _ in list(train_data) + list(test_data))

    def encoded(data):  # (tokens, lengths, labels), encoded once for the whole run
        tokens, lengths = encode([s for s, _ in data], width)
        return tokens, lengths, np.array([label for _, label in data], np.float32)

    tokens, lengths, labels = train_set = encoded(train_data)
    test_set = encoded(test_data)
    params = model.init(jax.random.PRNGKey(seed), tokens[:1])
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, tokens, lengths, labels):
        def loss_fn(p):
            last = _last_logits(model, p, tokens, lengths)
            return optax.sigmoid_binary_cross_entropy(last, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def n_right(params, tokens, lengths, labels):
        """How many strings the RNN classifies right (its last logit's sign), as an integer:
        a float32 mean of 1312 ones is 0.99999994, not 1."""
        return jnp.sum((_last_logits(model, params, tokens, lengths) > 0) == (labels > 0.5))

    def accuracy(params, data):
        return int(n_right(params, *data)) / len(data[2])

    rng = np.random.default_rng(seed)
    history = {"loss": [], "train_acc": [], "test_acc": [], "converged_epoch": None}
    n_batches = max(1, len(labels) // batch_size)
    bar = progress_bar(total=max_epochs, desc="epochs", enabled=progress)
    stop_at = max_epochs
    for epoch in range(1, max_epochs + 1):
        order = rng.permutation(len(labels))
        losses = []  # on the device: one read-back per epoch, not per step
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            params, opt_state, loss = step(
                params, opt_state, tokens[idx], lengths[idx], labels[idx]
            )
            losses.append(loss)
        history["loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["train_acc"].append(accuracy(params, train_set))
        history["test_acc"].append(accuracy(params, test_set))
        bar.update()
        if history["converged_epoch"] is None and history["test_acc"][-1] == 1.0:
            history["converged_epoch"] = epoch
            stop_at = epoch + extra_epochs
        if on_epoch is not None:
            on_epoch(epoch, params, history)
        if epoch >= stop_at:
            break
    bar.close()
    history["epochs"] = len(history["loss"])
    return params, history


def train_with_restarts(
    train_data: Sequence[tuple[str, bool]],
    test_data: Sequence[tuple[str, bool]],
    *,
    restarts: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
    **kwargs,
) -> tuple[hk.Params, dict, int]:
    """train() from initialisation seed, then seed + 100, seed + 200, ... (`restarts` more)
    until one converges: (params, history, the seed used). The last try is returned when none
    converges."""
    for attempt in range(restarts + 1):
        init_seed = seed + 100 * attempt
        params, history = train(train_data, test_data, seed=init_seed, **kwargs)
        if history["converged_epoch"] is not None:
            break
        log(
            f"initialisation seed {init_seed}: held-out accuracy {history['test_acc'][-1]:.4f} "
            f"after {history['epochs']} epochs, not 100%"
            + ("; trying a fresh initialisation" if attempt < restarts else "")
        )
    return params, history, init_seed
