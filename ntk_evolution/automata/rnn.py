"""Recurrent acceptors of binary strings (the Tomita languages) that label every prefix.

The default is the tagger of arXiv 2201.12451's code (viking-sudo-rm/dfa-extractor, models.py):
a beginning-of-string token, then the string's symbols, each embedded (`embed` dimensions) and
read by an Elman (tanh) RNN from a zero state; a linear readout of each state.

    h_0 = rnn(0, e(BOS)),  h_t = rnn(h_{t-1}, e(s_t)),  logit_t = w . out(h_t) + b

so position t is the prefix s_1..s_t (t = 0: the empty string), and logit_t > 0 says "in the
language". With embed = 0 (checkpoints of earlier versions) the symbols are one-hot and h_0 is
a learned parameter instead. GRU and LSTM cells are available too. The authors' readout has two
logits and a softmax; one logit and a sigmoid is the same model (the difference of the two).

Training (train) is theirs: binary cross-entropy at every prefix, averaged over each string's
prefixes and then over strings, AdamW, early stopping on the held-out prefix accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_evolution.automata.languages import ALPHABET
from ntk_evolution.utils import progress_bar

CELLS = ("vanilla", "gru", "lstm")
BOS = len(ALPHABET)  # the beginning-of-string token


def _torch_uniform(fan: int) -> hk.initializers.Initializer:
    """torch.nn.RNN / Linear's initialisation: uniform on +-1/sqrt(hidden or fan-in)."""
    bound = 1.0 / np.sqrt(fan)
    return hk.initializers.RandomUniform(-bound, bound)


class Elman(hk.RNNCore):
    """torch.nn.RNN's cell: h' = tanh(W_ih x + b_ih + W_hh h + b_hh), every weight and bias
    initialised uniformly on +-1/sqrt(hidden), as torch does (haiku's VanillaRNN draws a
    larger recurrent matrix, which made training on strings of length 100 diverge)."""

    def __init__(self, hidden: int, name: str | None = None):
        super().__init__(name=name)
        self.hidden = hidden

    def __call__(self, x, h):
        init = _torch_uniform(self.hidden)
        pre = hk.Linear(self.hidden, w_init=init, b_init=init, name="input_to_hidden")(x)
        pre += hk.Linear(self.hidden, w_init=init, b_init=init, name="hidden_to_hidden")(h)
        h = jnp.tanh(pre)
        return h, h

    def initial_state(self, batch_size):
        return jnp.zeros((batch_size, self.hidden))


def make_rnn(cell: str, hidden: int, embed: int = 0) -> hk.Transformed:
    """apply(params, None, tokens (B, T) int) -> (logits (B, T + 1), states (B, T + 1, S)):
    position t is the prefix of length t. S = hidden, or 2 * hidden for the LSTM (its output
    and cell state side by side). embed > 0: the paper's tagger (a BOS token and learned
    embeddings, zero initial state); embed = 0: one-hot symbols and a learned initial state."""
    if cell not in CELLS:
        raise ValueError(f"cell {cell!r}: use one of {CELLS}")

    def flat(state):
        return jnp.concatenate([state.hidden, state.cell], -1) if cell == "lstm" else state

    def forward(tokens):
        batch = tokens.shape[0]
        if embed > 0:  # the paper's tagger, initialised as torch initialises it
            core = {"vanilla": Elman, "gru": hk.GRU, "lstm": hk.LSTM}[cell](hidden)
            init = _torch_uniform(hidden)
            readout = hk.Linear(1, w_init=init, b_init=init, name="readout")
            inputs = jnp.concatenate([jnp.full((batch, 1), BOS, tokens.dtype), tokens], axis=1)
            embedding = hk.Embed(
                BOS + 1, embed, w_init=hk.initializers.RandomNormal(), name="embed"
            )
            vectors = embedding(inputs)
            outputs, states = hk.dynamic_unroll(
                core, vectors, core.initial_state(batch), time_major=False,
                return_all_states=True,
            )  # fmt: skip
            return readout(outputs)[..., 0], flat(states)
        core = {"vanilla": hk.VanillaRNN, "gru": hk.GRU, "lstm": hk.LSTM}[cell](hidden)
        readout = hk.Linear(1, name="readout")
        if cell == "lstm":
            h0 = hk.get_parameter("h0", [hidden], init=jnp.zeros)
            c0 = hk.get_parameter("c0", [hidden], init=jnp.zeros)
            state0 = hk.LSTMState(jnp.tile(h0, (batch, 1)), jnp.tile(c0, (batch, 1)))
            first = state0.hidden
        else:
            state0 = first = jnp.tile(hk.get_parameter("h0", [hidden], init=jnp.zeros), (batch, 1))
        inputs = jax.nn.one_hot(tokens, len(ALPHABET))
        outputs, states = hk.dynamic_unroll(
            core, inputs, state0, time_major=False, return_all_states=True
        )
        outputs = jnp.concatenate([first[:, None], outputs], axis=1)  # (B, T + 1, hidden)
        logits = readout(outputs)[..., 0]
        return logits, jnp.concatenate([flat(state0)[:, None], flat(states)], axis=1)

    return hk.transform(forward)


def encode(strings: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T) int32 padded with 0, lengths (B,)) of binary strings."""
    lengths = np.array([len(s) for s in strings], np.int32)
    tokens = np.zeros((len(strings), max(length or 0, lengths.max(initial=0), 1)), np.int32)
    for i, s in enumerate(strings):
        tokens[i, : len(s)] = [ALPHABET.index(c) for c in s]
    return tokens, lengths


@functools.lru_cache(maxsize=8)
def _forward_fn(cell: str, hidden: int, embed: int):
    return jax.jit(make_rnn(cell, hidden, embed).apply)


def prefix_outputs(
    params, cell: str, hidden: int, strings: Sequence[str], batch: int = 512, embed: int = 0
):
    """For each string, (logits (len + 1,), states (len + 1, S)) at every prefix, in batches
    of `batch` strings padded to a multiple of 8 symbols (few compiled shapes)."""
    forward = _forward_fn(cell, hidden, embed)
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


def rnn_oracle(params, meta: dict):
    """prefix_outputs of the RNN a train_rnn.py checkpoint describes (meta: cell, hidden,
    embed; embed 0 when absent, as in checkpoints of earlier versions)."""

    def oracle(strings):
        return prefix_outputs(
            params, meta["cell"], meta["hidden"], strings, embed=meta.get("embed", 0)
        )

    return oracle


def _encoded(strings: Sequence[str], labels: Sequence[Sequence[bool]], width: int):
    """(tokens (B, width), mask (B, width + 1) of real prefixes, labels (B, width + 1))."""
    tokens, lengths = encode(strings, width)
    mask = np.arange(width + 1)[None] <= lengths[:, None]
    y = np.zeros(mask.shape, np.float32)
    for i, row in enumerate(labels):
        y[i, : len(row)] = row
    return tokens, mask.astype(np.float32), y


def train(
    train_strings: Sequence[str],
    train_labels: Sequence[Sequence[bool]],
    dev_strings: Sequence[str],
    dev_labels: Sequence[Sequence[bool]],
    *,
    cell: str = "vanilla",
    hidden: int = 100,
    embed: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    max_epochs: int = 10,
    stop_threshold: int = 2,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int, hk.Params, dict], None] | None = None,
) -> tuple[hk.Params, dict]:
    """The authors' train_rnn.py: AdamW (torch's defaults: weight decay 0.01) on the binary
    cross-entropy at every prefix (labels[i][t]: prefix t of string i is in the language),
    batches of batch_size in a fresh order each epoch (the last partial batch dropped, as
    theirs), the held-out prefix accuracy after each epoch, and early stopping once
    stop_threshold epochs pass without a new best. Returns the parameters of the last epoch
    that matched the best held-out accuracy (their best.th: saved on >=, while the stopping
    clock restarts on > only) and the history: per epoch loss and train / held-out prefix
    accuracy, best_epoch (the first with the best accuracy), kept_epoch (the one returned),
    converged_epoch (the first with held-out accuracy 1, None if none), epochs, init_seed.
    on_epoch(epoch, params, history) is called after each epoch (epoch 0: the initialisation),
    e.g. to save every epoch's parameters."""
    model = make_rnn(cell, hidden, embed)
    width = max(len(s) for s in list(train_strings) + list(dev_strings))
    train_set = _encoded(train_strings, train_labels, width)
    dev_set = _encoded(dev_strings, dev_labels, width)
    params = model.init(jax.random.PRNGKey(seed), train_set[0][:1])
    optimizer = optax.adamw(lr, weight_decay=weight_decay)
    opt_state = optimizer.init(params)

    def loss_fn(p, tokens, mask, labels):
        logits, _ = model.apply(p, None, tokens)
        per_prefix = optax.sigmoid_binary_cross_entropy(logits, labels) * mask
        return jnp.mean(per_prefix.sum(1) / mask.sum(1))

    @jax.jit
    def step(params, opt_state, tokens, mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def n_right(params, tokens, mask, labels):
        """Prefixes labelled right, as an integer (a float32 mean of ones is not always 1)."""
        logits, _ = model.apply(params, None, tokens)
        return jnp.sum(((logits > 0) == (labels > 0.5)) * (mask > 0))

    def accuracy(params, data, chunk=2048):
        right = sum(
            int(n_right(params, *(a[i : i + chunk] for a in data)))
            for i in range(0, len(data[0]), chunk)
        )
        return right / float(data[1].sum())

    rng = np.random.default_rng(seed)
    history = {"loss": [], "train_acc": [], "test_acc": [], "best_epoch": 0, "kept_epoch": 0,
               "converged_epoch": None, "init_seed": seed}  # fmt: skip
    best, best_params = -1.0, params  # theirs: best_acc = 0., so the first epoch is kept
    if on_epoch is not None:
        on_epoch(0, params, history)
    n_batches = max(1, len(train_strings) // batch_size)
    bar = progress_bar(total=max_epochs, desc="epochs", enabled=progress)
    for epoch in range(1, max_epochs + 1):
        order = rng.permutation(len(train_strings))
        losses = []  # on the device: one read-back per epoch, not per step
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            params, opt_state, loss = step(params, opt_state, *(a[idx] for a in train_set))
            losses.append(loss)
        history["loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["train_acc"].append(accuracy(params, train_set))
        history["test_acc"].append(accuracy(params, dev_set))
        bar.update()
        bar.set_postfix(held_out=f"{history['test_acc'][-1]:.4f}")
        if history["converged_epoch"] is None and history["test_acc"][-1] == 1.0:
            history["converged_epoch"] = epoch
        if history["test_acc"][-1] >= best:  # theirs: saved when as good, the clock reset
            best_params, history["kept_epoch"] = params, epoch  # only when better
        if history["test_acc"][-1] > best:
            best, history["best_epoch"] = history["test_acc"][-1], epoch
        if on_epoch is not None:
            on_epoch(epoch, params, history)
        if epoch - history["best_epoch"] > stop_threshold:
            break
    bar.close()
    history["epochs"] = len(history["loss"])
    history["best_acc"] = best
    return best_params, history


def train_with_restarts(
    *data,
    restarts: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
    **kwargs,
) -> tuple[hk.Params, dict, int]:
    """train(*data) from initialisation seed, then seed + 100, seed + 200, ... (`restarts`
    more) while the best held-out prefix accuracy is below 1: (params, history, the seed
    used). The best try is returned when none reaches 1."""
    best = None
    for attempt in range(restarts + 1):
        init_seed = seed + 100 * attempt
        params, history = train(*data, seed=init_seed, **kwargs)
        if best is None or history["best_acc"] > best[1]["best_acc"]:
            best = (params, history, init_seed)
        if history["best_acc"] == 1.0:
            break
        log(
            f"initialisation seed {init_seed}: best held-out prefix accuracy "
            f"{history['best_acc']:.4f} after {history['epochs']} epochs, not 100%"
            + ("; trying a fresh initialisation" if attempt < restarts else "")
        )
    return best
