"""Train a recurrent acceptor on a Tomita language until it classifies every held-out string
right (then --extra_epochs more: training past convergence).

Data (ntk_evolution.automata.balanced_strings): for each length 0..--max_length, --per_length
strings, half in the language and half not, drawn uniformly from each side (seed --seed); the
held-out set likewise over lengths 0..--test_max_length (seed --seed + 1), without the
training strings where the language has others. Writes into --save_path:

  parameters_final.pkl   {'params', 'meta' (language, cell, hidden, converged_epoch, epochs,
                          accuracies, flags, version), 'history', 'train_strings',
                          'test_strings'}: the input of extract_automata.py
  training.png           loss and train / held-out accuracy per epoch

    python train_rnn.py --language 3 --save_path runs/tomita3
"""

from __future__ import annotations

import os

from ntk_evolution import __version__
from ntk_evolution.automata import TOMITA, tomita_data
from ntk_evolution.automata_plots import plot_rnn_training
from ntk_evolution.cli import Parser, check_out_dir, non_negative_int, positive_int
from ntk_evolution.rnn import CELLS, train_with_restarts
from utils import UserError, run_main, save_pickle


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--language", type=int, required=True, choices=range(1, 8), metavar="1..7")
    p.add_argument("--save_path", required=True, help="Folder for parameters_final.pkl.")
    p.add_argument("--cell", default="gru", choices=CELLS)
    p.add_argument("--hidden", type=positive_int, default=32, help="Hidden units.")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate.")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--max_length", type=non_negative_int, default=14, help="Training lengths.")
    p.add_argument("--test_max_length", type=non_negative_int, default=20)
    p.add_argument("--per_length", type=positive_int, default=64, help="Strings per length.")
    p.add_argument("--max_epochs", type=positive_int, default=300)
    p.add_argument(
        "--extra_epochs", type=non_negative_int, default=50,
        help="Epochs to go on after the held-out accuracy first reaches 100%%.",
    )  # fmt: skip
    p.add_argument(
        "--restarts", type=non_negative_int, default=2,
        help="Fresh initialisations (seed + 100 k) tried when one does not converge.",
    )  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out_dir(args.save_path, "--save_path")
    if args.per_length < 2:
        raise UserError("--per_length must be at least 2 (one string on each side)")
    train_data, test_data = tomita_data(
        args.language, args.max_length, args.test_max_length, args.per_length, args.seed
    )
    print(
        f"Tomita {args.language} ({TOMITA[args.language][0]}): {len(train_data)} training "
        f"strings (lengths 0-{args.max_length}), {len(test_data)} held out "
        f"(lengths 0-{args.test_max_length})"
    )
    params, history, seed = train_with_restarts(
        train_data, test_data, restarts=args.restarts, seed=args.seed, cell=args.cell,
        hidden=args.hidden, lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs,
        extra_epochs=args.extra_epochs,
    )  # fmt: skip
    converged = history["converged_epoch"]
    meta = {
        "kind": "tomita_rnn",
        "language": args.language,
        "cell": args.cell,
        "hidden": args.hidden,
        "init_seed": seed,
        "converged_epoch": converged,
        "epochs": history["epochs"],
        "train_acc": history["train_acc"][-1],
        "test_acc": history["test_acc"][-1],
        "flags": {k: v for k, v in vars(args).items() if k != "save_path"},
        "version": __version__,
    }
    record = {
        "params": params,
        "meta": meta,
        "history": history,
        "train_strings": [(s, bool(y)) for s, y in train_data],
        "test_strings": [(s, bool(y)) for s, y in test_data],
    }
    path = os.path.join(args.save_path, "parameters_final.pkl")
    save_pickle(record, path)
    plot_rnn_training(
        history, args.language, args.cell, os.path.join(args.save_path, "training.png")
    )
    if converged is None:
        print(
            f"warning: not converged: held-out accuracy {meta['test_acc']:.4f} after "
            f"{args.max_epochs} epochs (raise --max_epochs or --hidden); saved anyway"
        )
    else:
        print(
            f"converged at epoch {converged} (held-out accuracy 100%), stopped at epoch "
            f"{history['epochs']}; train accuracy {meta['train_acc']:.4f}"
        )
    print(f"saved {path}")
    return record


if __name__ == "__main__":
    run_main(main)
