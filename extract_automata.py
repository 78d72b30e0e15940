"""Extract a finite automaton from an RNN trained by train_rnn.py, by the method of arXiv
2201.12451 as its code does it (viking-sudo-rm/dfa-extractor; ntk_evolution.extraction):
merge the prefix-tree states whose RNN hidden states are nearly the same.

1. Extraction strings: --n_strings strings of --train_length, half drawn from the language and
   half uniformly at random (the authors' balanced sampler, seed --random_seed).
2. The prefix tree of those strings, each node labelled by the RNN's prediction (--eval preds)
   or the true label (--eval labels) and holding the RNN's hidden state there.
3. --method similarity (default): every pair of nodes with the same true label whose hidden
   states have cosine similarity above a threshold is merged, pair by pair in the authors'
   order. The threshold is --sim_threshold when given (the authors' fixed default is 0.99);
   by default it is picked as the authors' --find_threshold does, on 20 validation strings of
   twice --train_length (the best prefix accuracy over 0.925, 0.930, ..., 0.995): on this
   project's RNNs 0.99 keeps too many states apart (docs/differences.md).
   --method kmeans: the authors' baseline, --n_clusters clusters of hidden states as states.
   --method rpni: red-blue state merging on the RNN's labels only (this project's earlier
   method, a baseline that never reads the hidden states).
   A transition missing at the end rejects. --minimize: the minimal DFA instead (without its
   dead state, as the authors count it).

Faithfulness, on --n_test strings of random length 0..--test_length (half from the language):
accuracy against the RNN's predictions and against the true labels; and exact equivalence with
the true Tomita DFA, with a shortest counterexample when they differ.

Writes --save_path (the automaton as JSON: alphabet, states, start, accepting, transitions; a
transition left out rejects), and beside it <stem>.png (its state diagram; the minimal DFA's
when it has more than 16 states, none when that has more too) and <stem>_check.json (the
facts above).

    python extract_automata.py --model_path runs/tomita3/parameters_final.pkl --save_path dfa.json
"""

from __future__ import annotations

import os

import numpy as np

from ntk_evolution.automata.extraction import (
    EVALS,
    METHODS,
    cross_validate,
    gold_labels,
    kmeans_extract,
    prefix_accuracy,
    prefix_tree,
    rpni,
    similarity_merge,
    word_accuracy,
)
from ntk_evolution.automata.languages import (
    DFA,
    TOMITA,
    counterexample,
    minimize,
    paper_balanced,
    paper_test,
    tomita_dfa,
    trim,
)
from ntk_evolution.automata.plots import plot_dfa
from ntk_evolution.automata.rnn import rnn_oracle
from ntk_evolution.cli import Parser, finite_float, non_negative_int, positive_int, with_values
from ntk_evolution.utils import UserError, load_pickle, run_main, write_json

MAX_DRAWN_STATES = 16  # a circle of more states is unreadable


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--model_path", required=True, help="parameters_*.pkl of train_rnn.py.")
    p.add_argument("--save_path", required=True, help="The automaton's JSON file.")
    p.add_argument("--method", default="similarity", choices=METHODS,
                   help="similarity: the paper's; kmeans and rpni: baselines.")  # fmt: skip
    p.add_argument("--sim_threshold", type=finite_float(), default=None,
                   help="Merge two states when their hidden states' cosine similarity exceeds "
                   "this (the authors' default: 0.99; above 1: nothing merges). Not given: "
                   "picked as --find_threshold does.")  # fmt: skip
    p.add_argument("--find_threshold", action="store_true",
                   help="Pick the threshold on 20 validation strings of twice --train_length "
                   "(the authors' cross_validate); the default unless --sim_threshold is "
                   "given.")  # fmt: skip
    p.add_argument("--eval", dest="eval_on", default="preds", choices=EVALS,
                   help="Label states by the RNN's predictions or the true labels.")  # fmt: skip
    p.add_argument("--n_strings", type=positive_int, default=100,
                   help="Extraction strings (the paper's data-size study: 2 to 500).")  # fmt: skip
    p.add_argument("--train_length", type=positive_int, default=10,
                   help="Length of every extraction string.")  # fmt: skip
    p.add_argument("--n_clusters", type=positive_int, default=20, help="--method kmeans: states.")
    p.add_argument("--minimize", action="store_true",
                   help="Write the minimal DFA (without its dead state) instead of the merged "
                   "automaton; both state counts are reported either way.")  # fmt: skip
    p.add_argument("--n_test", type=positive_int, default=1000, help="Test strings.")
    p.add_argument("--test_length", type=non_negative_int, default=50,
                   help="Test strings have random lengths 0 to this.")  # fmt: skip
    p.add_argument("--random_seed", "--seed", dest="random_seed", type=non_negative_int,
                   default=0, help="Seed of the extraction, validation, test strings.")  # fmt: skip
    args = p.parse_args(argv)
    if args.find_threshold and args.sim_threshold is not None:
        p.error("--find_threshold picks the threshold: pass it or --sim_threshold, not both")
    return with_values(args, find_threshold=args.sim_threshold is None)


def load_rnn(path: str) -> dict:
    """The record of train_rnn.py at `path`, checked to be one."""
    if not os.path.isfile(path):
        raise UserError(f"--model_path {path} does not exist (train_rnn.py writes it)")
    record = load_pickle(path, "RNN checkpoint")
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != "tomita_rnn" or "params" not in record:
        raise UserError(f"--model_path {path} is not an RNN checkpoint of train_rnn.py")
    return record


def extract(record: dict, args, log=print) -> tuple[DFA, DFA, dict]:
    """The automaton (partial), its minimal DFA (trimmed) and the facts about them, from a
    checkpoint."""
    meta = record["meta"]
    truth = tomita_dfa(meta["language"])
    oracle = rnn_oracle(record["params"], meta)
    rng = np.random.default_rng(args.random_seed)
    strings = paper_balanced(truth, args.n_strings, args.train_length, rng)
    val = paper_balanced(truth, 20, 2 * args.train_length, rng)
    test = paper_test(truth, args.n_test, args.test_length, rng)
    outputs = oracle(strings)
    gold = gold_labels(outputs, strings, truth, args.eval_on)
    tree = prefix_tree(strings, outputs, truth)
    facts = {"threshold": None, "validation_scores": None}
    if args.method == "similarity" and args.find_threshold:
        val_gold = gold_labels(oracle(val), val, truth, args.eval_on)
        dfa, facts["threshold"], facts["validation_scores"] = cross_validate(
            tree, args.eval_on, val, val_gold
        )
        log(f"threshold picked on 20 validation strings: {facts['threshold']:.3f}")
    elif args.method == "similarity":
        dfa, facts["threshold"] = (
            similarity_merge(tree, args.sim_threshold, args.eval_on),
            (args.sim_threshold),
        )
    elif args.method == "kmeans":
        dfa = kmeans_extract(strings, outputs, gold, args.n_clusters, args.random_seed)
    else:
        dfa = rpni(tree, args.eval_on)
    minimal = trim(minimize(dfa))
    test_outputs = oracle(test)
    rnn_says = [bool(logits[-1] > 0) for logits, _ in test_outputs]
    witness = counterexample(dfa, truth)
    facts.update(
        prefix_tree_nodes=len(tree.strings),
        states=dfa.n_states,
        states_minimized=minimal.n_states,
        true_states=trim(truth).n_states,
        train_prefix_accuracy=prefix_accuracy(dfa, strings, gold),
        test_accuracy_rnn=word_accuracy(dfa, test, rnn_says),
        test_accuracy_labels=word_accuracy(dfa, test, [truth.accepts(s) for s in test]),
        rnn_test_accuracy=word_accuracy(truth, test, rnn_says),
        equivalent_to_true_dfa=witness is None,
        counterexample=witness,
    )
    return dfa, minimal, facts


def main(argv=None) -> dict:
    args = parse_args(argv)
    if os.path.isdir(args.save_path):
        raise UserError(f"--save_path {args.save_path} is a folder: pass the JSON file to write")
    record = load_rnn(args.model_path)
    meta = record["meta"]
    language = meta["language"]
    merged, minimal, facts = extract(record, args)
    dfa = minimal if args.minimize else merged  # the automaton written
    report = {
        "model_path": args.model_path,
        "language": language,
        "definition": TOMITA[language][0],
        "method": args.method,
        "eval": args.eval_on,
        "n_strings": args.n_strings,
        "train_length": args.train_length,
        "minimized": args.minimize,
        **facts,
        "written_states": dfa.n_states,
        "n_test": args.n_test,
        "test_length": args.test_length,
        "rnn_cell": meta["cell"],
        "rnn_hidden": meta["hidden"],
        "rnn_epoch": meta.get("epoch", meta.get("epochs")),
        "random_seed": args.random_seed,
    }
    stem = os.path.splitext(args.save_path)[0]
    write_json(dfa.to_json(), args.save_path)
    write_json(report, f"{stem}_check.json")
    drawn = dfa if dfa.n_states <= MAX_DRAWN_STATES else minimal
    if drawn.n_states <= MAX_DRAWN_STATES:
        what = "Minimal DFA" if drawn is minimal else "Automaton"
        shown = (
            "" if drawn is dfa else f" (minimised for the picture: {dfa.n_states} merged states)"
        )
        plot_dfa(
            drawn,
            f"{what} extracted ({args.method}) from the {meta['cell']} RNN on "
            f"Tomita {language}{shown}",
            f"{stem}.png",
        )
    else:
        drawn = None
    method = args.method + (
        f", threshold {facts['threshold']:.3f}" if facts["threshold"] is not None else ""
    )
    print(
        f"Tomita {language} ({method}): {facts['states']} states after merging, "
        f"{facts['states_minimized']} minimised (true DFA: {facts['true_states']}; prefix tree: "
        f"{facts['prefix_tree_nodes']} nodes from {args.n_strings} strings of length "
        f"{args.train_length})"
    )
    print(
        f"accuracy on {args.n_test} test strings of length 0-{args.test_length}: "
        f"{facts['test_accuracy_rnn']:.4f} against the RNN, {facts['test_accuracy_labels']:.4f} "
        f"against the true labels (the RNN itself: {facts['rnn_test_accuracy']:.4f})"
    )
    witness = facts["counterexample"]
    if witness is None:
        print("equivalent to the true Tomita DFA")
    else:
        truth = tomita_dfa(language)
        shown = repr(witness) if witness else "the empty string"
        print(
            f"NOT equivalent to the true Tomita DFA: counterexample {shown} (the true language "
            f"{'accepts' if truth.accepts(witness) else 'rejects'} it, the extracted automaton "
            f"{'accepts' if dfa.accepts(witness) else 'rejects'} it)"
        )
    pictures = f", {stem}.png" if drawn is not None else f" (no picture: {dfa.n_states} states)"
    print(f"saved {args.save_path}{pictures}, {stem}_check.json")
    return report


if __name__ == "__main__":
    run_main(main)
