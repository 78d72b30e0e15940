"""`make automata`: the experiments of arXiv 2201.12451 (automaton extraction from RNNs by
merging states whose hidden states are nearly the same) on the seven Tomita languages, then
REPORT.md with tables, figures and the abstract's claims beside our numbers. About 10 minutes on
2 CPU cores; --full runs the paper's sizes (hours on a CPU).

For each language, train_rnn.py trains the paper's tagger (Elman RNN, 100 hidden units), every
epoch saved and training going on after the held-out accuracy reaches 100% (no early stop), into
--out/tomita<L>/ (kept: a second run reuses it when the flags are the same). Then, with
extract_automata.py's functions, from the kept checkpoint unless said otherwise, and over
--seeds draws of the extraction strings (length 10, the authors' balanced sampler):

  1. data: similarity merging (threshold 0.99) from --sizes strings;
  2. epochs: the same from 100 strings at every epoch's checkpoint (the authors' eval_by_epoch);
  3. threshold: the threshold grid from 100 strings, and the cross-validated pick;
  4. methods: similarity (0.99 and cross-validated), k-means (20 clusters), RPNI;
  5. labels: states labelled by the RNN's predictions or by the true labels;
  6. exactness: extract_automata.py's default extraction (threshold cross-validated) from 100
     strings against the true DFA (equivalence, a shortest counterexample) and its state
     diagram.

Faithfulness is the accuracy on 1000 test strings of lengths 0-50 (half from the language),
against the RNN's predictions and against the true labels.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import train_rnn
from extract_automata import MAX_DRAWN_STATES
from ntk_evolution.automata.extraction import (
    THRESHOLD_GRID,
    cosine_similarities,
    cross_validate,
    gold_labels,
    kmeans_extract,
    prefix_tree,
    rpni,
    similarity_merge,
    word_accuracy,
)
from ntk_evolution.automata.languages import (
    TOMITA,
    counterexample,
    minimize,
    paper_balanced,
    paper_test,
    tomita_dfa,
    trim,
)
from ntk_evolution.automata.plots import plot_dfa, plot_method_bars, plot_study_curves
from ntk_evolution.automata.rnn import rnn_oracle
from ntk_evolution.cli import Parser, positive_int
from ntk_evolution.study.reports import table
from ntk_evolution.utils import atomic_file, load_pickle, run_main, write_json

QUICK_TRAINING = "--n_train 3000 --train_length 50 --n_dev 500 --dev_length 100 --max_epochs 12"
# the authors' train_rnn.py sizes
FULL_TRAINING = "--n_train 100000 --train_length 100 --n_dev 1000 --dev_length 200 --max_epochs 20"
THRESHOLDS = [0.9, *np.round(THRESHOLD_GRID, 3), 0.999]
FIXED_THRESHOLD = 0.99  # the authors' argparse default (in THRESHOLDS)
N_STRINGS, LENGTH, N_TEST, TEST_LENGTH = 100, 10, 1000, 50

CLAIMS = """The abstract of arXiv 2201.12451 claims that the method
1. extracts faithful automata from RNNs trained on all seven Tomita languages;
2. extracts better automata from more data;
3. extracts better automata from RNNs trained for more epochs after they learned the language
   perfectly;
4. shows why: training past convergence compresses the RNN's state space (fewer states
   after merging)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--out", default="automata_runs", help="Folder of the runs and REPORT.md.")
    p.add_argument("--languages", type=int, nargs="+", default=list(range(1, 8)),
                   choices=range(1, 8), metavar="L", help="Tomita languages.")  # fmt: skip
    p.add_argument("--seeds", type=positive_int, default=5,
                   help="Draws of extraction strings per setting (the authors: 5).")  # fmt: skip
    p.add_argument("--epoch_seeds", type=positive_int, default=3,
                   help="Draws per epoch in the epoch study.")  # fmt: skip
    p.add_argument("--sizes", type=positive_int, nargs="+",
                   default=[2, 5, 10, 20, 50, 100, 200, 500],
                   help="Numbers of extraction strings (the authors: 5 to 500).")  # fmt: skip
    p.add_argument("--full", action="store_true",
                   help=f"Train at the authors' sizes ({FULL_TRAINING}) instead of "
                   f"{QUICK_TRAINING}.")  # fmt: skip
    p.add_argument("--training", default=None,
                   help="train_rnn.py flags replacing the default sizes (for tests).")  # fmt: skip
    return p.parse_args(argv)


def train_language(language: int, args) -> tuple[str, dict]:
    """The run folder of one language, trained unless an earlier run with the same flags is
    there: (folder, the kept checkpoint's record)."""
    folder = os.path.join(args.out, f"tomita{language}")
    flags = (args.training or (FULL_TRAINING if args.full else QUICK_TRAINING)).split()
    argv = ["--language", str(language), "--save_path", folder, "--save_all", *flags]
    wanted = train_rnn.parse_args(argv + ["--stop_threshold", "1000"])
    final = os.path.join(folder, "parameters_final.pkl")
    if os.path.exists(final):
        record = load_pickle(final, "RNN checkpoint")
        if record["meta"]["flags"] == {k: v for k, v in vars(wanted).items() if k != "save_path"}:
            print(f"Tomita {language}: reusing {final}")
            record["meta"]["reused"] = True
            return folder, record
    return folder, train_rnn.main(argv + ["--stop_threshold", "1000"])


class Language:
    """One language's true DFA, test strings and extraction from a checkpoint."""

    def __init__(self, language: int):
        self.language = language
        self.truth = tomita_dfa(language)
        self.test = paper_test(self.truth, N_TEST, TEST_LENGTH, np.random.default_rng(12345))
        self.test_labels = [self.truth.accepts(s) for s in self.test]

    def model(self, record: dict):
        """(oracle, the RNN's labels of the test strings)."""
        oracle = rnn_oracle(record["params"], record["meta"])
        return oracle, [bool(logits[-1] > 0) for logits, _ in oracle(self.test)]

    def strings(self, n: int, seed: int) -> list[str]:
        return paper_balanced(self.truth, n, LENGTH, np.random.default_rng(seed))

    def score(self, dfa, rnn_says: list[bool]) -> dict:
        return {
            "accuracy": word_accuracy(dfa, self.test, rnn_says),
            "accuracy_labels": word_accuracy(dfa, self.test, self.test_labels),
            "states": dfa.n_states,
            "states_minimized": trim(minimize(dfa)).n_states,
            "equivalent": counterexample(dfa, self.truth) is None,
        }


def curves(rows: list[dict], x_key: str, xs: list) -> dict[int, dict[str, np.ndarray]]:
    """{language: {metric: (seeds, len(xs))}} from flat rows."""
    out = {}
    for language in sorted({r["language"] for r in rows}):
        mine = [r for r in rows if r["language"] == language]
        seeds = sorted({r["seed"] for r in mine})
        out[language] = {
            key: np.array(
                [
                    [
                        next((r[key] for r in mine if r["seed"] == s and r[x_key] == x), np.nan)
                        for x in xs
                    ]
                    for s in seeds
                ],
                float,
            )  # fmt: skip
            for key in ("accuracy", "accuracy_labels", "states", "states_minimized", "equivalent")
        }
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    rows = {k: [] for k in ("data", "epochs", "threshold", "methods", "labels", "exact")}
    rnn, reused = {}, []
    for language in args.languages:
        folder, record = train_language(language, args)
        if record["meta"].get("reused"):
            reused.append(language)
        lang = Language(language)
        oracle, rnn_says = lang.model(record)
        history = record["history"]
        rnn[language] = {
            "converged_epoch": history["converged_epoch"],
            "kept_epoch": record["meta"]["kept_epoch"],
            "epochs": record["meta"]["epochs"],
            "held_out_prefix_accuracy": record["meta"]["test_acc"],
            "test_accuracy": word_accuracy(lang.truth, lang.test, rnn_says),
        }
        print(f"Tomita {language}: extraction studies ({time.time() - start:.0f} s so far)")

        def tree_for(strings, oracle=oracle, lang=lang):
            outputs = oracle(strings)
            return outputs, prefix_tree(strings, outputs, lang.truth)

        base = {"language": language}
        for n in args.sizes:  # 1. data
            for seed in range(args.seeds):
                _, tree = tree_for(lang.strings(n, seed))
                dfa = similarity_merge(tree, 0.99)
                rows["data"].append({**base, "n": n, "seed": seed, **lang.score(dfa, rnn_says)})
        for epoch in range(record["meta"]["epochs"] + 1):  # 2. epochs
            snapshot = load_pickle(os.path.join(folder, f"parameters_epoch{epoch}.pkl"))
            snap_oracle, snap_says = lang.model(snapshot)
            for seed in range(args.epoch_seeds):
                strings = lang.strings(N_STRINGS, seed)
                outputs = snap_oracle(strings)
                dfa = similarity_merge(prefix_tree(strings, outputs, lang.truth), 0.99)
                rows["epochs"].append(
                    {**base, "epoch": epoch, "seed": seed, **lang.score(dfa, snap_says)}
                )
        for seed in range(args.seeds):  # 3-6 from 100 strings
            strings = lang.strings(N_STRINGS, seed)
            outputs, tree = tree_for(strings)
            sim = cosine_similarities(tree.states)
            scores = {}  # threshold -> score of the merge there (labels: the RNN's)
            for threshold in THRESHOLDS:
                dfa = similarity_merge(tree, float(threshold), similarity=sim)
                scores[float(threshold)] = lang.score(dfa, rnn_says)
                rows["threshold"].append(
                    {**base, "threshold": float(threshold), "seed": seed,
                     **scores[float(threshold)]}
                )  # fmt: skip
            fixed = next(v for t, v in scores.items() if np.isclose(t, FIXED_THRESHOLD))
            val = paper_balanced(lang.truth, 20, 2 * LENGTH, np.random.default_rng(1000 + seed))
            val_gold = gold_labels(oracle(val), val, lang.truth, "preds")
            picked, threshold, _ = cross_validate(tree, "preds", val, val_gold, similarity=sim)
            gold = gold_labels(outputs, strings, lang.truth, "preds")
            for method, score in (
                (f"similarity {FIXED_THRESHOLD}", fixed),
                ("similarity, cross-validated", lang.score(picked, rnn_says)),
                ("k-means, 20 clusters",
                 lang.score(kmeans_extract(strings, outputs, gold, 20, seed), rnn_says)),
                ("RPNI", lang.score(rpni(tree), rnn_says)),
            ):  # fmt: skip
                rows["methods"].append(
                    {**base, "method": method, "seed": seed, "threshold": threshold, **score}
                )
            labelled = similarity_merge(tree, FIXED_THRESHOLD, "labels", similarity=sim)
            for eval_on, score in (("preds", fixed), ("labels", lang.score(labelled, rnn_says))):
                rows["labels"].append({**base, "eval": eval_on, "seed": seed, **score})
            if seed == 0:  # extract_automata.py's default: the threshold cross-validated
                dfa = picked
                witness = counterexample(dfa, lang.truth)
                minimal = trim(minimize(dfa))
                if minimal.n_states <= MAX_DRAWN_STATES:
                    plot_dfa(
                        minimal,
                        f"Tomita {language}: minimal DFA extracted from the Elman RNN "
                        f"({N_STRINGS} strings, threshold {threshold:.3f})",
                        os.path.join(args.out, f"dfa_tomita{language}.png"),
                    )
                rows["exact"].append(
                    {**base, "prefix_tree_nodes": len(tree.strings), "threshold": threshold,
                     **lang.score(dfa, rnn_says), "true_states": trim(lang.truth).n_states,
                     "counterexample": witness}
                )  # fmt: skip
    return write_report(args, rows, rnn, time.time() - start, reused)


def counts(value: float) -> str:
    """A mean number of states, to one decimal."""
    return f"{value:.1f}"


def mean_by(rows: list[dict], key: str, value: str, **where) -> dict:
    """{row[key]: mean of row[value]} over the rows matching `where`."""
    chosen = [r for r in rows if all(r[k] == v for k, v in where.items())]
    keys = list(dict.fromkeys(r[key] for r in chosen))
    return {k: float(np.mean([r[value] for r in chosen if r[key] == k])) for k in keys}


def verdicts(rows: dict, rnn: dict, args) -> list[str]:
    """Each claim of the abstract beside what our numbers say, decided from the numbers."""
    exact = rows["exact"]
    equivalent = [r["language"] for r in exact if r["equivalent"]]
    small, large = min(args.sizes), max(args.sizes)
    acc = mean_by(rows["data"], "n", "accuracy")
    eq = mean_by(rows["data"], "n", "equivalent")
    past, after_states, at_states, after_acc, at_acc = [], [], [], [], []
    for language, facts in rnn.items():
        converged = facts["converged_epoch"]
        if converged is None or converged >= facts["epochs"]:
            continue
        past.append(language)
        by_epoch = {
            key: mean_by(rows["epochs"], "epoch", key, language=language)
            for key in ("states", "accuracy")
        }
        at_states.append(by_epoch["states"][converged])
        after_states.append(by_epoch["states"][facts["epochs"]])
        at_acc.append(by_epoch["accuracy"][converged])
        after_acc.append(by_epoch["accuracy"][facts["epochs"]])

    def word(ok):
        return "**supported**" if ok else "**not supported**"

    fixed = [r for r in rows["methods"] if r["method"] == f"similarity {FIXED_THRESHOLD}"]
    fixed_languages = sorted(r["language"] for r in fixed if r["seed"] == 0 and r["equivalent"])
    lines = [
        f"1. Faithful automata for all seven languages: {word(len(equivalent) == 7)} with "
        "extract_automata.py's default (the threshold cross-validated, the authors' "
        f"`--find_threshold`). From {N_STRINGS} strings (seed 0) the extraction is equivalent "
        f"to the true DFA for {len(equivalent)} of {len(exact)} languages ({equivalent}); mean "
        f"test accuracy against the RNN {np.mean([r['accuracy'] for r in exact]):.4f}. At the "
        f"authors' fixed default 0.99, {len(fixed_languages)} of {len(exact)} "
        f"({fixed_languages}), and {np.mean([r['equivalent'] for r in fixed]):.0%} of all "
        f"{len(fixed)} draws.",
        f"2. More data helps: {word(acc[large] > acc[small] and eq[large] >= eq[small])}. "
        f"Mean test accuracy {acc[small]:.4f} from {small} strings, {acc[large]:.4f} from "
        f"{large}; share equivalent to the true DFA {eq[small]:.2f} and {eq[large]:.2f}.",
    ]
    if past:
        better = np.mean(after_acc) >= np.mean(at_acc)
        fewer = np.mean(after_states) < np.mean(at_states)
        lines += [
            f"3. Training past convergence helps: {word(better and np.mean(after_acc) > 0)} "
            f"by accuracy here: mean test accuracy {np.mean(at_acc):.4f} at the epoch of "
            f"convergence, {np.mean(after_acc):.4f} at the last epoch (languages {past}).",
            f"4. It compresses the state space: {word(fewer)}. Mean states after merging "
            f"{np.mean(at_states):.1f} at convergence, {np.mean(after_states):.1f} at the last "
            "epoch.",
        ]
    else:
        lines.append("3-4. Not tested: no RNN reached 100% held-out accuracy before its last "
                     "epoch.")  # fmt: skip
    return lines


def write_report(args, rows: dict, rnn: dict, seconds: float, reused: list[int]) -> dict:
    out = args.out
    languages = sorted(rnn)
    plot_study_curves(
        args.sizes, curves(rows["data"], "n", args.sizes), "extraction strings (length 10)",
        "Similarity merging (threshold 0.99) against the number of extraction strings",
        os.path.join(out, "automata_data.png"), xscale="log",
    )  # fmt: skip
    epochs = list(range(max(f["epochs"] for f in rnn.values()) + 1))
    plot_study_curves(
        epochs, curves(rows["epochs"], "epoch", epochs), "training epoch (0: initialisation)",
        f"Similarity merging from {N_STRINGS} strings at every epoch's checkpoint",
        os.path.join(out, "automata_epochs.png"),
        marks={k: f["converged_epoch"] for k, f in rnn.items()},
    )  # fmt: skip
    plot_study_curves(
        THRESHOLDS, curves(rows["threshold"], "threshold", THRESHOLDS),
        "cosine-similarity threshold", f"Similarity merging from {N_STRINGS} strings against "
        "the threshold", os.path.join(out, "automata_threshold.png"),
    )  # fmt: skip
    methods = list(dict.fromkeys(r["method"] for r in rows["methods"]))
    by_method = {
        m: {
            k: {
                key: mean_by(rows["methods"], "language", key, method=m)[k]
                for key in ("accuracy", "accuracy_labels", "states", "states_minimized",
                            "equivalent")
            } | {"true_states": trim(tomita_dfa(k)).n_states}
            for k in languages
        }
        for m in methods
    }  # fmt: skip
    plot_method_bars(
        by_method, f"Extraction methods from {N_STRINGS} strings (mean over {args.seeds} draws)",
        os.path.join(out, "automata_methods.png"),
    )  # fmt: skip
    training = args.training or (FULL_TRAINING if args.full else QUICK_TRAINING)
    rnn_rows = [
        [k, TOMITA[k][0], f["converged_epoch"], f["epochs"], f["kept_epoch"],
         f["held_out_prefix_accuracy"], f["test_accuracy"]]
        for k, f in sorted(rnn.items())
    ]  # fmt: skip
    exact_rows = [
        [r["language"], f"{r['threshold']:.3f}", r["prefix_tree_nodes"], r["states"],
         r["states_minimized"],
         r["true_states"], r["accuracy"], r["accuracy_labels"],
         "yes" if r["equivalent"] else f"no ({r['counterexample']!r})"]
        for r in rows["exact"]
    ]  # fmt: skip

    def summary(part: str, key: str, x) -> list:
        means = {k: mean_by(rows[part], key, k)[x]
                 for k in ("accuracy", "states", "states_minimized", "equivalent")}  # fmt: skip
        return [x, means["accuracy"], counts(means["states"]),
                counts(means["states_minimized"]), f"{means['equivalent']:.2f}"]  # fmt: skip

    data_rows = [summary("data", "n", n) for n in args.sizes]
    threshold_rows = [summary("threshold", "threshold", t) for t in THRESHOLDS]
    picked = [r["threshold"] for r in rows["methods"] if r["method"].endswith("validated")]

    def over_languages(m, key):
        return float(np.mean([by_method[m][k][key] for k in languages]))

    method_rows = [
        [m, over_languages(m, "accuracy"), over_languages(m, "accuracy_labels"),
         counts(over_languages(m, "states_minimized")), f"{over_languages(m, 'equivalent'):.2f}"]
        for m in methods
    ]  # fmt: skip
    label_rows = [
        [e, *(mean_by(rows["labels"], "eval", key)[e] for key in ("accuracy", "accuracy_labels")),
         counts(mean_by(rows["labels"], "eval", "states")[e]),
         f"{mean_by(rows['labels'], 'eval', 'equivalent')[e]:.2f}"]
        for e in ("preds", "labels")
    ]  # fmt: skip
    lines = [
        "# Automaton extraction from RNNs by similarity merging (arXiv 2201.12451)",
        "",
        f"`make automata` ({seconds / 60:.1f} minutes{', --full' if args.full else ''}"
        + (f"; the RNNs of Tomita {reused} reused from an earlier run" if reused else "")
        + "): the "
        f"paper's Elman tagger (embedding 10, 100 hidden units) trained with `{training}` and "
        "no early stop (every epoch kept); extraction strings of length 10 from the authors' "
        f"balanced sampler, {args.seeds} draws per setting; test: {N_TEST} strings of lengths "
        f"0-{TEST_LENGTH}, half from the language. Accuracy is against the RNN unless said.",
        "",
        "## The abstract's claims beside our numbers",
        "",
        CLAIMS,
        "",
        *verdicts(rows, rnn, args),
        "",
        "## The RNNs",
        "",
        table(["Tomita", "definition", "100% held out at epoch", "epochs", "kept epoch",
               "held-out prefix accuracy", "test accuracy"], rnn_rows),
        "",
        f"## Exactness: extract_automata.py's default from {N_STRINGS} strings (seed 0)",
        "",
        "Threshold cross-validated. This project's addition: exact equivalence with the true "
        "DFA (product automaton) and a shortest counterexample. State diagrams (minimised; "
        f"none above {MAX_DRAWN_STATES} states): "
        + ", ".join(f"[Tomita {r['language']}](dfa_tomita{r['language']}.png)"
                    for r in rows["exact"] if r["states_minimized"] <= MAX_DRAWN_STATES)
        + ".",
        "",
        table(["Tomita", "threshold", "prefix-tree nodes", "states", "minimised", "true states",
               "accuracy (RNN)", "accuracy (labels)", "equivalent"], exact_rows),
        "",
        "## 1. More data",
        "",
        "![data](automata_data.png)",
        "",
        table(["strings", "accuracy", "states", "minimised", "share equivalent"], data_rows),
        "",
        "## 2. Training past convergence",
        "",
        "Stars: the epoch at which the RNN first labels every held-out prefix right.",
        "",
        "![epochs](automata_epochs.png)",
        "",
        "## 3. The threshold",
        "",
        f"Cross-validated picks (20 validation strings of length {2 * LENGTH}): mean "
        f"{np.mean(picked):.3f}, range {min(picked):.3f}-{max(picked):.3f}.",
        "",
        "![threshold](automata_threshold.png)",
        "",
        table(["threshold", "accuracy", "states", "minimised", "share equivalent"],
              threshold_rows),
        "",
        "## 4. Similarity merging against k-means and RPNI",
        "",
        "RPNI (red-blue merging with a label-consistency check) reads only the RNN's labels; "
        "k-means and similarity merging read its hidden states.",
        "",
        "![methods](automata_methods.png)",
        "",
        table(["method", "accuracy (RNN)", "accuracy (labels)", "minimised states",
               "share equivalent"], method_rows),
        "",
        "## 5. RNN predictions against true labels",
        "",
        "States labelled by the RNN's predictions (`--eval preds`) or the true labels "
        "(`--eval labels`), threshold 0.99: the same automaton wherever the RNN labels every "
        "prefix of the extraction strings right.",
        "",
        table(["labels from", "accuracy (RNN)", "accuracy (labels)", "states",
               "share equivalent"], label_rows),
        "",
    ]  # fmt: skip
    text = "\n".join(lines)
    with atomic_file(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    record = {"rnn": {str(k): v for k, v in rnn.items()}, **rows, "seconds": seconds}
    write_json(record, os.path.join(out, "results.json"))
    print(text)
    return record


if __name__ == "__main__":
    run_main(main)
