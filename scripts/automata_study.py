"""`make automata`: automaton extraction from RNNs by state merging (arXiv 2201.12451) in
miniature on the seven Tomita languages, then REPORT.md with tables, pictures and the paper's
claims beside our figures. About 2 minutes on the 2-core CPU.

For each language and --seeds seed, one GRU is trained with train_rnn.py's defaults (data,
width, learning rate, fresh initialisations when one does not converge;
rnn.train_with_restarts) until every held-out string is classified right, then
--snapshots' largest number of epochs more, keeping the parameters at each snapshot (epochs
after convergence). Then:
  1. extraction with all training strings from the snapshot of train_rnn.py's default
     (--extra_epochs 50): states, agreement with the RNN, equivalence with the true DFA;
  2. data: extraction from --sizes random subsets of the training strings (--subsets draws
     each), from the same snapshot: the share that is equivalent to the true DFA;
  3. training past convergence: at each snapshot, how compressed the hidden-state space is
     (the spread of hidden states within each true DFA state over the distance between those
     states' centroids) and the share of equivalent extractions, from all strings and from
     --hard_size strings.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import train_rnn
from ntk_evolution.automata import (
    TOMITA,
    counterexample,
    random_strings,
    tomita_data,
    tomita_dfa,
)
from ntk_evolution.automata_plots import plot_automata_studies, plot_dfa
from ntk_evolution.cli import Parser
from ntk_evolution.extraction import PrefixTree, agreement, extract, extract_from_tree, prefix_tree
from ntk_evolution.reports import table
from ntk_evolution.rnn import prefix_outputs, train_with_restarts
from utils import write_json

DEFAULTS = train_rnn.parse_args(["--language", "1", "--save_path", "."])  # train_rnn.py's
MAX_LENGTH, TEST_MAX_LENGTH, PER_LENGTH = (
    DEFAULTS.max_length, DEFAULTS.test_max_length, DEFAULTS.per_length
)  # fmt: skip
CELL, HIDDEN, DEFAULT_EXTRA = DEFAULTS.cell, DEFAULTS.hidden, DEFAULTS.extra_epochs

PAPER = """The paper (arXiv 2201.12451) reports, on the Tomita languages:
- faithful automata extracted for all seven languages;
- extraction helped by more data;
- extraction helped by training past convergence, because that compresses the RNN's state
  space."""


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--languages", type=int, nargs="+", default=list(range(1, 8)))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--snapshots", type=int, nargs="+", default=[0, 10, 50, 150])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--subsets", type=int, default=3, help="random subsets per size")
    p.add_argument("--hard_size", type=int, default=32, help="strings, for study 3")
    p.add_argument("--out", default="automata_runs")
    return p.parse_args(argv)


def compression(tree: PrefixTree, language: int) -> float:
    """Mean distance of each prefix's hidden state to the centroid of its true DFA state,
    divided by the mean distance between those centroids: lower is more compressed."""
    dfa = tomita_dfa(language)
    groups = np.array([dfa.run(s) for s in tree.strings])
    keys = np.unique(groups)
    centroids = np.stack([tree.states[groups == g].mean(axis=0) for g in keys])
    within = np.mean(
        [np.linalg.norm(tree.states[i] - centroids[np.searchsorted(keys, groups[i])]) for i in
         range(len(groups))]
    )  # fmt: skip
    between = np.mean(
        [np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1 :]]
    )
    return float(within / between)


def extraction_result(oracle, strings: list[str], language: int, tree=None) -> dict:
    """extract() from `strings` (or from their prefix tree, when given), judged against the
    true DFA."""
    dfa, info = extract(strings, oracle) if tree is None else extract_from_tree(tree, oracle)
    witness = counterexample(dfa, tomita_dfa(language))
    return {"dfa": dfa, "equivalent": witness is None, "counterexample": witness, **info}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    check_strings = random_strings(2000, TEST_MAX_LENGTH, np.random.default_rng(12345))
    runs = []
    for language in args.languages:
        dfa = tomita_dfa(language)
        for seed in args.seeds:
            train_data, test_data = tomita_data(
                language, MAX_LENGTH, TEST_MAX_LENGTH, PER_LENGTH, seed
            )
            snapshots = {}

            def keep(epoch, params, history, snapshots=snapshots):
                converged = history["converged_epoch"]
                if converged is not None and epoch - converged in args.snapshots:
                    snapshots[epoch - converged] = params

            t = time.time()
            _, history, _ = train_with_restarts(
                train_data, test_data, restarts=DEFAULTS.restarts, seed=seed, cell=CELL,
                hidden=HIDDEN, lr=DEFAULTS.lr, batch_size=DEFAULTS.batch_size,
                max_epochs=DEFAULTS.max_epochs, extra_epochs=max(args.snapshots), progress=False,
                on_epoch=keep,
            )  # fmt: skip
            strings = [s for s, _ in train_data]
            run = {
                "language": language, "seed": seed, "converged_epoch": history["converged_epoch"],
                "train_s": time.time() - t, "n_strings": len(strings), "snapshots": {},
            }  # fmt: skip
            print(
                f"Tomita {language} seed {seed}: converged at epoch {run['converged_epoch']} "
                f"({run['train_s']:.0f} s)",
                flush=True,
            )
            if run["converged_epoch"] is None:
                runs.append(run)
                continue
            for extra, params in sorted(snapshots.items()):

                def oracle(batch, params=params):
                    return prefix_outputs(params, CELL, HIDDEN, batch)

                tree = prefix_tree(strings, oracle)  # one RNN pass for the two uses below
                whole = extraction_result(oracle, strings, language, tree)
                hard = [
                    extraction_result(
                        oracle, list(np.random.default_rng(k).choice(strings, args.hard_size,
                                                                     replace=False)), language,
                    )["equivalent"]
                    for k in range(args.subsets)
                ]  # fmt: skip
                run["snapshots"][extra] = {
                    "compression": compression(tree, language),
                    "equivalent_all": whole["equivalent"],
                    "equivalent_hard": float(np.mean(hard)),
                    "states": whole["dfa"].n_states,
                }
                if extra != DEFAULT_EXTRA:
                    continue
                run["main"] = {
                    "states": whole["dfa"].n_states,
                    "true_states": dfa.n_states,
                    "equivalent": whole["equivalent"],
                    "counterexample": whole["counterexample"],
                    "agreement": agreement(whole["dfa"], oracle, check_strings),
                }
                if seed == args.seeds[0]:
                    plot_dfa(
                        whole["dfa"], f"DFA extracted from a GRU on Tomita {language}",
                        os.path.join(args.out, f"dfa_tomita{language}.png"),
                    )  # fmt: skip
                run["data"] = {}
                for size in args.sizes:
                    size = min(size, len(strings))
                    rng = np.random.default_rng(1000 + size)
                    results = [
                        extraction_result(
                            oracle, list(rng.choice(strings, size, replace=False)), language
                        )["equivalent"]
                        for _ in range(args.subsets)
                    ]
                    run["data"][size] = float(np.mean(results))
                run["data"]["all"] = float(whole["equivalent"])
            runs.append(run)
    report = write_report(args, runs, time.time() - start)
    return report


def write_report(args, runs: list[dict], seconds: float) -> dict:
    done = [r for r in runs if "main" in r]
    rows = [
        [
            r["language"], TOMITA[r["language"]][0], r["seed"], r["converged_epoch"],
            r["main"]["states"], r["main"]["true_states"], r["main"]["agreement"],
            "yes" if r["main"]["equivalent"] else f"no ({r['main']['counterexample']!r})",
        ]
        for r in done
    ]  # fmt: skip
    for r in runs:
        if "main" not in r:
            rows.append([r["language"], TOMITA[r["language"]][0], r["seed"], "not converged"])
            rows[-1] += ["-"] * 4
    n_equivalent = sum(r["main"]["equivalent"] for r in done)
    languages_ok = sorted({r["language"] for r in done if r["main"]["equivalent"]})
    data_rows = []
    for size in args.sizes + ["all"]:
        values = [r["data"][min(size, r["n_strings"]) if size != "all" else "all"] for r in done]
        data_rows.append(
            [size, float(np.mean(values)), len(values) * (1 if size == "all" else args.subsets)]
        )
    snap_rows = []
    for extra in args.snapshots:
        entries = [r["snapshots"][extra] for r in done if extra in r["snapshots"]]
        snap_rows.append(
            [
                extra,
                float(np.mean([e["compression"] for e in entries])),
                float(np.mean([e["equivalent_all"] for e in entries])),
                float(np.mean([e["equivalent_hard"] for e in entries])),
                float(np.mean([e["states"] for e in entries])),
            ]
        )
    plot_automata_studies(
        runs, args.snapshots, args.hard_size, os.path.join(args.out, "automata_study.png")
    )
    lines = [
        "# Automaton extraction from RNNs by state merging: a miniature study",
        "",
        f"`make automata` ({seconds / 60:.1f} minutes): GRU, {HIDDEN} hidden units, "
        f"train_rnn.py's data (lengths 0-{MAX_LENGTH}, {PER_LENGTH} strings per length, "
        f"balanced; held out: lengths 0-{TEST_MAX_LENGTH}); seeds {args.seeds}.",
        "",
        "## What the paper reports",
        "",
        PAPER,
        "",
        "## 1. Extraction from every training string, at train_rnn.py's default "
        f"(--extra_epochs {DEFAULT_EXTRA})",
        "",
        f"Equivalent to the true DFA: {n_equivalent} of {len(runs)} runs; languages with an "
        f"equivalent extraction: {languages_ok}. Agreement: with the RNN on 2000 strings of "
        f"lengths 0-{TEST_MAX_LENGTH}.",
        "",
        table(
            [
                "Tomita",
                "definition",
                "seed",
                "converged at epoch",
                "states",
                "true states",
                "agreement with RNN",
                "equivalent",
            ],
            rows,
        ),  # fmt: skip
        "",
        "## 2. More data",
        "",
        "Share of extractions equivalent to the true DFA, from random subsets of the training "
        f"strings ({args.subsets} per size, every language and seed):",
        "",
        table(["strings", "equivalent", "extractions"], data_rows),
        "",
        "## 3. Training past convergence",
        "",
        "Compression: mean distance of a prefix's hidden state to the centroid of its true DFA "
        "state, over the mean distance between centroids (lower: hidden states cluster by DFA "
        f"state). Equivalent: from all strings, and from {args.hard_size} random strings "
        f"({args.subsets} subsets).",
        "",
        table(
            [
                "epochs after convergence",
                "compression",
                "equivalent (all strings)",
                f"equivalent ({args.hard_size} strings)",
                "states (all strings)",
            ],
            snap_rows,
        ),  # fmt: skip
        "",
        "![studies](automata_study.png)",
        "",
        "State diagrams: " + ", ".join(f"[Tomita {k}](dfa_tomita{k}.png)" for k in args.languages),
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write(text)
    record = {"runs": runs, "data": data_rows, "snapshots": snap_rows}
    for run in record["runs"]:
        run["snapshots"] = {str(k): v for k, v in run["snapshots"].items()}
        run["data"] = {str(k): v for k, v in run.get("data", {}).items()}
    write_json(record, os.path.join(args.out, "results.json"))
    print(text)
    return record


if __name__ == "__main__":
    main()
