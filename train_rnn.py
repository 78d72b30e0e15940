"""Train a recurrent tagger on a Tomita language, as the code of arXiv 2201.12451
(viking-sudo-rm/dfa-extractor, train_rnn.py) does: an Elman (tanh) RNN with a 10-dimensional
embedding and 100 hidden units labels every prefix of its input (ntk_evolution.rnn), trained
with AdamW (1e-3) in batches of 16 on the label of every prefix, with early stopping on the
held-out prefix accuracy (the best epoch is kept).

Data (the authors' balanced sampler, ntk_evolution.automata.paper_balanced): --n_train strings
of --train_length, half drawn uniformly from the language and half uniformly at random (seed
--random_seed); the held-out set likewise, --n_dev strings of --dev_length (seed + 1). The
authors use 100000 strings of length 100 and 1000 of length 200; the defaults here are 10000
and 1000 of those lengths (about 2 minutes on 2 CPU cores).

Writes into --save_path:

  parameters_final.pkl     {'params', 'meta' (kind 'tomita_rnn', language, cell, hidden,
                            embed, init_seed, best_epoch, converged_epoch, epochs, accuracies,
                            data, flags, version), 'history'}: the input of extract_automata.py
  parameters_epoch<k>.pkl  with --save_all, the same after each epoch k (0: initialisation)
  training.png             loss and train / held-out prefix accuracy per epoch

    python train_rnn.py --language 3 --save_path runs/tomita3
"""

from __future__ import annotations

import os

import numpy as np

from ntk_evolution import __version__
from ntk_evolution.automata.languages import TOMITA, paper_balanced, prefix_labels, tomita_dfa
from ntk_evolution.automata.plots import plot_rnn_training
from ntk_evolution.automata.rnn import CELLS, train_with_restarts
from ntk_evolution.cli import Parser, finite_float, non_negative_int, positive_int
from ntk_evolution.utils import check_out_dir, run_main, save_pickle


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--language", type=int, required=True, choices=range(1, 8), metavar="1..7",
                   help="Tomita language.")  # fmt: skip
    p.add_argument("--save_path", required=True, help="Folder for parameters_final.pkl.")
    p.add_argument("--cell", default="vanilla", choices=CELLS,
                   help="vanilla: the paper's Elman (tanh) RNN.")  # fmt: skip
    p.add_argument("--hidden", type=positive_int, default=100, help="Hidden units.")
    p.add_argument("--embed", type=non_negative_int, default=10,
                   help="Symbol embedding size (0: one-hot symbols and a learned initial "
                   "state, as this project's earlier RNNs).")  # fmt: skip
    p.add_argument("--lr", type=finite_float(0, inclusive=False), default=1e-3,
                   help="AdamW learning rate.")  # fmt: skip
    p.add_argument("--weight_decay", type=finite_float(0), default=0.01,
                   help="AdamW weight decay (torch's default, which the authors use).")  # fmt: skip
    p.add_argument("--batch_size", type=positive_int, default=16, help="Strings per step.")
    p.add_argument("--n_train", type=positive_int, default=10000,
                   help="Training strings (the authors: 100000).")  # fmt: skip
    p.add_argument("--train_length", type=positive_int, default=100,
                   help="Length of every training string.")  # fmt: skip
    p.add_argument("--n_dev", type=positive_int, default=1000, help="Held-out strings.")
    p.add_argument("--dev_length", type=positive_int, default=200,
                   help="Length of every held-out string.")  # fmt: skip
    p.add_argument("--max_epochs", "--n_epochs", type=positive_int, default=10,
                   help="Most epochs (the authors' --n_epochs).")  # fmt: skip
    p.add_argument("--stop_threshold", type=non_negative_int, default=2,
                   help="Stop once this many epochs pass after the best held-out accuracy "
                   "(the authors' early stopping).")  # fmt: skip
    p.add_argument("--restarts", type=non_negative_int, default=2,
                   help="Fresh initialisations (seed + 100 k) tried while the best held-out "
                   "prefix accuracy is below 100%%.")  # fmt: skip
    p.add_argument("--save_all", action="store_true",
                   help="Also save the parameters after every epoch (parameters_epoch<k>.pkl), "
                   "for the epoch study.")  # fmt: skip
    p.add_argument("--random_seed", "--seed", dest="random_seed", type=non_negative_int,
                   default=0, help="Seed of the data and the initialisation.")  # fmt: skip
    return p.parse_args(argv)


def tagged(dfa, n: int, length: int, seed: int) -> tuple[list[str], list[list[bool]]]:
    """The authors' balanced sample and the label of every prefix of each string."""
    strings = paper_balanced(dfa, n, length, np.random.default_rng(seed))
    return strings, [prefix_labels(dfa, s) for s in strings]


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.save_path, "--save_path")
    os.makedirs(args.save_path, exist_ok=True)
    dfa = tomita_dfa(args.language)
    train_set = tagged(dfa, args.n_train, args.train_length, args.random_seed)
    dev_set = tagged(dfa, args.n_dev, args.dev_length, args.random_seed + 1)
    print(
        f"Tomita {args.language} ({TOMITA[args.language][0]}): {args.n_train} training strings "
        f"of length {args.train_length}, {args.n_dev} held out of length {args.dev_length}, "
        f"half from the language; {args.cell} RNN, {args.hidden} hidden units"
    )
    data = {k: getattr(args, k) for k in ("n_train", "train_length", "n_dev", "dev_length")}
    flags = {k: v for k, v in vars(args).items() if k != "save_path"}

    def record_of(params, history, init_seed, epoch=None) -> dict:
        last = epoch if epoch is not None else history["kept_epoch"]
        meta = {
            "kind": "tomita_rnn",
            "language": args.language,
            "cell": args.cell,
            "hidden": args.hidden,
            "embed": args.embed,
            "init_seed": init_seed,
            "epoch": last,
            "best_epoch": history["best_epoch"],
            "kept_epoch": history["kept_epoch"],
            "converged_epoch": history["converged_epoch"],
            "epochs": len(history["loss"]),
            "train_acc": history["train_acc"][last - 1] if last else None,
            "test_acc": history["test_acc"][last - 1] if last else None,
            "data": data,
            "flags": flags,
            "version": __version__,
        }
        return {"params": params, "meta": meta, "history": dict(history)}

    def on_epoch(epoch, params, history):
        if epoch == 0:  # a fresh try: no epoch file of an earlier one may stay
            if args.save_all:
                for name in os.listdir(args.save_path):
                    if name.startswith("parameters_epoch") and name.endswith(".pkl"):
                        os.remove(os.path.join(args.save_path, name))
        else:
            print(
                f"epoch {epoch}: loss {history['loss'][-1]:.4f}, prefix accuracy train "
                f"{history['train_acc'][-1]:.4f}, held out {history['test_acc'][-1]:.4f}",
                flush=True,
            )
        if args.save_all:
            path = os.path.join(args.save_path, f"parameters_epoch{epoch}.pkl")
            save_pickle(record_of(params, history, history["init_seed"], epoch), path)

    params, history, seed = train_with_restarts(
        *train_set, *dev_set, restarts=args.restarts, seed=args.random_seed, cell=args.cell,
        hidden=args.hidden, embed=args.embed, lr=args.lr, weight_decay=args.weight_decay,
        batch_size=args.batch_size, max_epochs=args.max_epochs,
        stop_threshold=args.stop_threshold, on_epoch=on_epoch,
    )  # fmt: skip
    record = record_of(params, history, seed)
    path = os.path.join(args.save_path, "parameters_final.pkl")
    save_pickle(record, path)
    plot_rnn_training(
        history, args.language, args.cell, os.path.join(args.save_path, "training.png")
    )
    meta = record["meta"]
    print(
        f"kept epoch {meta['kept_epoch']} of {meta['epochs']}: held-out prefix accuracy "
        f"{meta['test_acc']:.4f}, train {meta['train_acc']:.4f}"
        + ("" if meta["test_acc"] == 1.0 else " (warning: below 100%; saved anyway)")
    )
    print(f"saved {path}")
    return record


if __name__ == "__main__":
    run_main(main)
