"""Extract a finite automaton from an RNN trained by train_rnn.py, by state merging over the
prefix tree of its training strings (ntk_evolution.extraction), and check it.

Faithfulness, printed and saved beside the DFA:
  - agreement of the DFA with the RNN on --n_check strings drawn uniformly over lengths
    0..--check_length (each length equally often, the string uniform among that length's);
  - exact equivalence with the true Tomita DFA (product automaton), with a shortest
    counterexample when they differ.

Writes --save_path (the DFA as JSON: alphabet, states, start, accepting, transitions), and
beside it <stem>.png (its state diagram) and <stem>_check.json (the facts above).

    python extract_automata.py --model_path runs/tomita3/parameters_final.pkl --save_path dfa.json
"""

from __future__ import annotations

import os

import numpy as np

from ntk_evolution.automata import TOMITA, counterexample, random_strings, tomita_dfa
from ntk_evolution.automata_plots import plot_dfa
from ntk_evolution.cli import Parser, non_negative_int, positive_int
from ntk_evolution.extraction import agreement, extract
from ntk_evolution.rnn import prefix_outputs
from utils import UserError, load_pickle, run_main, write_json


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--model_path", required=True, help="parameters_final.pkl of train_rnn.py.")
    p.add_argument("--save_path", required=True, help="The DFA's JSON file.")
    p.add_argument(
        "--n_strings", type=positive_int, default=None,
        help="Training strings in the prefix tree, drawn at random (default: all of them).",
    )  # fmt: skip
    p.add_argument(
        "--max_distance", type=float, default=None,
        help="Merge only states whose RNN hidden states are this close (default: no bound; "
        "candidates are tried nearest first either way).",
    )  # fmt: skip
    p.add_argument("--n_check", type=positive_int, default=2000)
    p.add_argument("--check_length", type=non_negative_int, default=20)
    p.add_argument("--seed", type=non_negative_int, default=0)
    return p.parse_args(argv)


def load_rnn(path: str) -> dict:
    """The record of train_rnn.py at `path`, checked to be one."""
    if not os.path.isfile(path):
        raise UserError(f"--model_path {path} does not exist (train_rnn.py writes it)")
    record = load_pickle(path, "RNN checkpoint")
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != "tomita_rnn":
        raise UserError(f"--model_path {path} is not an RNN checkpoint of train_rnn.py")
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = load_rnn(args.model_path)
    meta = record["meta"]
    language = meta["language"]
    rng = np.random.default_rng(args.seed)
    strings = [s for s, _ in record["train_strings"]]
    if args.n_strings is not None and args.n_strings < len(strings):
        strings = [strings[i] for i in sorted(rng.choice(len(strings), args.n_strings, False))]

    def oracle(batch):
        return prefix_outputs(record["params"], meta["cell"], meta["hidden"], batch)

    dfa, info = extract(strings, oracle, args.max_distance)
    true_dfa = tomita_dfa(language)
    checks = random_strings(args.n_check, args.check_length, rng)
    rnn_agreement = agreement(dfa, oracle, checks)
    witness = counterexample(dfa, true_dfa)
    report = {
        "model_path": args.model_path,
        "language": language,
        "definition": TOMITA[language][0],
        "strings_in_prefix_tree": len(strings),
        **info,
        "states": dfa.n_states,
        "true_states": true_dfa.n_states,
        "agreement_with_rnn": rnn_agreement,
        "check_strings": args.n_check,
        "check_length": args.check_length,
        "equivalent_to_true_dfa": witness is None,
        "counterexample": witness,
        "rnn_converged_epoch": meta.get("converged_epoch"),
        "rnn_epochs": meta.get("epochs"),
    }
    write_json(dfa.to_json(), args.save_path)
    stem = os.path.splitext(args.save_path)[0]
    write_json(report, f"{stem}_check.json")
    plot_dfa(
        dfa, f"DFA extracted from the {meta['cell'].upper()} on Tomita {language}", f"{stem}.png"
    )
    print(
        f"Tomita {language}: {dfa.n_states} states (true DFA: {true_dfa.n_states}) from a prefix "
        f"tree of {info['prefix_tree_nodes']} nodes ({len(strings)} strings)"
    )
    print(
        f"agreement with the RNN on {args.n_check} strings of length 0-{args.check_length}: "
        f"{rnn_agreement:.4f}"
    )
    if witness is None:
        print("equivalent to the true Tomita DFA")
    else:
        shown = repr(witness) if witness else "the empty string"
        print(
            f"NOT equivalent to the true Tomita DFA: counterexample {shown} (the true language "
            f"{'accepts' if true_dfa.accepts(witness) else 'rejects'} it, the extracted DFA "
            f"{'accepts' if dfa.accepts(witness) else 'rejects'} it)"
        )
    print(f"saved {args.save_path}, {stem}.png, {stem}_check.json")
    return report


if __name__ == "__main__":
    run_main(main)
