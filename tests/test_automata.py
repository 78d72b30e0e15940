"""Tomita languages, DFA operations, the extraction of arXiv 2201.12451 (similarity merging of
hidden states), its baselines and the RNN scripts, against their definitions: membership
predicates, brute force over all short strings, exact equivalence, a plain transcription of
the authors' merge, torch.nn.RNN."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import one_line_error

from ntk_evolution.automata.extraction import (
    THRESHOLD_GRID,
    cosine_similarities,
    cross_validate,
    gold_labels,
    kmeans_extract,
    prefix_accuracy,
    prefix_tree,
    rpni,
    similarity_merge,
)
from ntk_evolution.automata.languages import (
    DFA,
    TOMITA,
    all_strings,
    counterexample,
    minimize,
    paper_balanced,
    paper_test,
    prefix_labels,
    sample_positive,
    tomita_dfa,
    trim,
)

SHORT = [s for n in range(13) for s in all_strings(n)]


@pytest.mark.parametrize("language", range(1, 8))
def test_tomita_dfas_match_their_definitions_and_are_minimal(language):
    dfa, member = tomita_dfa(language), TOMITA[language][1]
    wrong = [s for s in SHORT if dfa.accepts(s) != member(s)]
    assert not wrong, f"Tomita {language} DFA disagrees with its definition on {wrong[:5]}"
    assert minimize(dfa).n_states == dfa.n_states


def test_tomita_3_reads_maximal_runs():
    """An odd run of 1s then an odd run of 0s is rejected only when that run of 0s is whole."""
    member = TOMITA[3][1]
    assert not member("10") and not member("1000") and not member("01110")
    assert member("100") and member("1100") and member("11") and member("0110")
    assert not member("1011") and member("1101") and member("10011")


def brute_force_difference(a: DFA, b: DFA, max_length: int = 10) -> str | None:
    return next((s for s in SHORT if len(s) <= max_length and a.accepts(s) != b.accepts(s)), None)


def test_counterexample_is_a_shortest_disagreement():
    for i in range(1, 8):
        for j in range(1, 8):
            a, b = tomita_dfa(i), tomita_dfa(j)
            witness = counterexample(a, b)
            if i == j:
                assert witness is None
                continue
            assert witness is not None and a.accepts(witness) != b.accepts(witness)
            assert len(witness) == len(brute_force_difference(a, b))


def test_minimize_merges_equivalent_states_and_drops_unreachable_ones():
    """Tomita 6 written with each state twice (copies indistinguishable) and an unreachable
    state: minimisation gives back 3 states, the same language."""
    base = tomita_dfa(6)
    delta = [tuple(n + 3 * (q % 2) for n in base.delta[q % 3]) for q in range(6)] + [(6, 6)]
    redundant = DFA(7, 0, frozenset({0, 3}), tuple(delta))
    assert brute_force_difference(redundant, base) is None
    small = minimize(redundant)
    assert small.n_states == 3 and counterexample(small, base) is None


def test_json_round_trip():
    for language in range(1, 8):
        dfa = tomita_dfa(language)
        record = json.loads(json.dumps(dfa.to_json()))
        assert set(record) == {"alphabet", "states", "start", "accepting", "transitions"}
        assert counterexample(DFA.from_json(record), dfa) is None


def dfa_oracle(dfa: DFA, noise: float = 0.0, seed: int = 0):
    """A perfect recurrent tagger: logits +-1 by acceptance of each prefix, hidden states the
    one-hot DFA state (plus Gaussian noise)."""
    rng = np.random.default_rng(seed)

    def oracle(strings):
        outputs = []
        for s in strings:
            states = [dfa.run(s[:t]) for t in range(len(s) + 1)]
            logits = np.array([1.0 if q in dfa.accepting else -1.0 for q in states])
            hidden = np.eye(dfa.n_states)[states] + noise * rng.normal(
                size=(len(states), dfa.n_states)
            )
            outputs.append((logits, hidden))
        return outputs

    return oracle


def tree_of(language: int, n: int = 100, noise: float = 0.01, seed: int = 0):
    dfa = tomita_dfa(language)
    strings = paper_balanced(dfa, n, 10, np.random.default_rng(seed))
    outputs = dfa_oracle(dfa, noise, seed)(strings)
    return dfa, strings, outputs, prefix_tree(strings, outputs, dfa)


def authors_merge(tree, threshold: float) -> tuple[dict, dict, int]:
    """A plain transcription of the authors' cosine_merging and Dfa.merge_states (a table of
    [symbol, target] arcs, every table scanned on each merge): (table, final, start)."""
    n = len(tree.strings)
    table = {
        q: [[a, c] for a, c in enumerate(row) if c >= 0] for q, row in enumerate(tree.children)
    }
    final = {q: bool(tree.predicted[q]) for q in range(n)}
    start = 0
    sim = cosine_similarities(tree.states)
    for i in range(n):
        for j in range(i):
            if tree.true[i] != tree.true[j] or not sim[i, j] > threshold:
                continue
            if i not in table or j not in table:
                continue
            for arcs in table.values():
                for arc in arcs:
                    if arc[1] == j:
                        arc[1] = i
            for arc in table[j]:
                if not any(arc[0] == x[0] for x in table[i]):
                    table[i].append([arc[0], arc[1]])
            if start == j:
                start = i
            del table[j], final[j]
    return table, final, start


@pytest.mark.parametrize("language", range(1, 8))
def test_similarity_merge_is_the_authors_merge(language):
    """Noisy one-hot states (some pairs above the threshold, some not): the same states, start,
    accepting states and transitions as the transcription, state for state."""
    _, _, _, tree = tree_of(language, n=40, noise=0.3, seed=language)
    for threshold in (0.5, 0.9, 0.99):
        dfa = similarity_merge(tree, threshold)
        table, final, start = authors_merge(tree, threshold)
        alive = sorted(table)
        assert dfa.n_states == len(alive) and alive[dfa.start] == start
        assert {alive[q] for q in dfa.accepting} == {q for q in alive if final[q]}
        for q, arcs in table.items():
            row = dfa.delta[alive.index(q)]
            assert {a: alive[row[a]] for a in range(2) if row[a] >= 0} == dict(map(tuple, arcs))


@pytest.mark.parametrize("language", range(1, 8))
def test_each_method_recovers_the_dfa_behind_a_perfect_tagger(language):
    dfa, strings, outputs, tree = tree_of(language)
    gold = gold_labels(outputs, strings, dfa, "preds")
    for extracted in (
        similarity_merge(tree, 0.99),
        rpni(tree),
        kmeans_extract(strings, outputs, gold, n_clusters=dfa.n_states),
    ):
        assert counterexample(extracted, dfa) is None
        assert trim(minimize(extracted)).n_states == trim(dfa).n_states
    assert prefix_accuracy(similarity_merge(tree, 0.99), strings, gold) == 1.0


def test_a_threshold_above_one_merges_nothing():
    """The prefix tree itself: one state per node, accepting the sample's accepted prefixes,
    rejecting every string off the tree."""
    dfa, strings, _, tree = tree_of(3)
    extracted = similarity_merge(tree, 1.01)
    assert (
        extracted.n_states == len(tree.strings) == len({s[:t] for s in strings for t in range(11)})
    )
    assert all(extracted.accepts(p) == dfa.accepts(p) for p in tree.strings)
    off_tree = next(s for s in all_strings(11) if s[:10] not in set(strings))
    assert not extracted.accepts(off_tree)


def test_the_hidden_states_drive_similarity_merging_and_not_rpni():
    """Replacing the hidden states (by noise, or by one shared vector) changes what
    similarity merging extracts; RPNI, which reads labels only, gives the same automaton."""
    dfa, strings, outputs, tree = tree_of(4)
    before = (similarity_merge(tree, 0.99), rpni(tree))
    rng = np.random.default_rng(1)
    for states in (rng.normal(size=tree.states.shape), np.ones_like(tree.states)):
        tree.states = states
        after = (similarity_merge(tree, 0.99), rpni(tree))
        assert after[1] == before[1]
        assert after[0] != before[0] and counterexample(after[0], dfa) is not None
    assert counterexample(before[0], dfa) is None


def test_cross_validate_takes_the_first_best_threshold():
    """Noisy states: low thresholds over-merge, so the validation score rises with the
    threshold; the pick is the first grid point with the best score."""
    dfa, _, _, tree = tree_of(5, noise=0.2)
    val = paper_balanced(dfa, 20, 20, np.random.default_rng(7))
    gold = [prefix_labels(dfa, s) for s in val]
    grid = [0.3, 0.6, 0.8, 0.9, 0.95]
    extracted, threshold, scores = cross_validate(tree, "preds", val, gold, grid)
    assert threshold == grid[int(np.argmax(scores))] and max(scores) > min(scores)
    assert prefix_accuracy(extracted, val, gold) == max(scores)


def test_partial_automata_reject_missing_transitions_and_round_trip():
    partial = DFA(2, 0, frozenset({1}), ((1, -1), (-1, 0)))  # accepts (01)*0
    assert partial.accepts("0") and partial.accepts("010") and not partial.accepts("1")
    assert not partial.accepts("00") and not partial.is_total
    record = json.loads(json.dumps(partial.to_json()))
    assert record["transitions"] == {"0": {"0": "1"}, "1": {"1": "0"}}
    assert DFA.from_json(record) == partial
    complete = partial.complete()
    assert (
        complete.n_states == 3 and complete.is_total and counterexample(complete, partial) is None
    )
    assert trim(minimize(partial)).n_states == 2 and minimize(partial).n_states == 3
    assert trim(tomita_dfa(1)).n_states == 1 and trim(tomita_dfa(5)).n_states == 4


def test_paper_samplers():
    """Balanced: positive and uniform strings alternate, all of one length; (10)* at an odd
    length falls back to the longest shorter one, as the authors' sampler. Test: lengths
    0..max, the first half in the language. Positives are uniform among their length's."""
    rng = np.random.default_rng(0)
    dfa = tomita_dfa(3)
    strings = paper_balanced(dfa, 400, 10, rng)
    assert len(strings) == 400 and {len(s) for s in strings} == {10}
    assert all(dfa.accepts(s) for s in strings[::2])
    assert 0.2 < np.mean([dfa.accepts(s) for s in strings[1::2]]) < 0.6
    assert sample_positive(tomita_dfa(2), 7, 3, rng) == ["101010"] * 3
    test = paper_test(tomita_dfa(4), 1000, 50, rng)
    assert all(tomita_dfa(4).accepts(s) for s in test[:500])
    assert max(map(len, test)) <= 50 and min(map(len, test)) == 0
    counts = collections.Counter(sample_positive(tomita_dfa(4), 5, 4800, rng))
    assert len(counts) == 24 and sum((c - 200) ** 2 / 200 for c in counts.values()) < 60


def test_elman_tagger_is_torch_rnn_with_its_weights():
    """The default tagger run with the weights of the authors' torch.nn.Embedding -> nn.RNN
    (tanh) -> nn.Linear gives torch's states and logits at every position (BOS first)."""
    import jax
    import torch

    from ntk_evolution.automata.rnn import BOS, make_rnn, prefix_outputs

    torch.manual_seed(0)
    embed, rnn = torch.nn.Embedding(3, 10), torch.nn.RNN(10, 100, batch_first=True)
    out = torch.nn.Linear(100, 1)

    def numpy(x, transpose=False):
        x = x.detach().numpy()
        return x.T if transpose else x

    ours = make_rnn("vanilla", 100, 10).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))
    params = {
        "embed": {"embeddings": numpy(embed.weight)},
        "elman/input_to_hidden": {"w": numpy(rnn.weight_ih_l0, True), "b": numpy(rnn.bias_ih_l0)},
        "elman/hidden_to_hidden": {"w": numpy(rnn.weight_hh_l0, True), "b": numpy(rnn.bias_hh_l0)},
        "readout": {"w": numpy(out.weight, True), "b": numpy(out.bias)},
    }
    assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, params)
    for string in ("0110", "1", ""):
        states, _ = rnn(embed(torch.tensor([[BOS] + [int(c) for c in string]])))
        logits, hidden = prefix_outputs(params, "vanilla", 100, [string], embed=10)[0]
        np.testing.assert_allclose(hidden, numpy(states[0]), atol=1e-5)
        np.testing.assert_allclose(logits, numpy(out(states)[0, :, 0]), atol=1e-5)


def test_rnn_prefix_outputs_are_the_outputs_on_each_prefix():
    """Position t of a padded batch is the RNN run on the first t symbols alone, for every
    cell, with embeddings (the paper's tagger) and one-hot (earlier checkpoints)."""
    import jax

    from ntk_evolution.automata.rnn import encode, make_rnn, prefix_outputs

    for cell in ("vanilla", "gru", "lstm"):
        for embed in (0, 4):
            params = make_rnn(cell, 8, embed).init(jax.random.PRNGKey(1), encode(["01"])[0])
            strings = ["0110", "1", ""]
            outputs = prefix_outputs(params, cell, 8, strings, embed=embed)
            for s, (logits, states) in zip(strings, outputs, strict=True):
                assert logits.shape == (len(s) + 1,)
                assert states.shape == (len(s) + 1, 16 if cell == "lstm" else 8)
                for t in range(len(s) + 1):
                    alone = prefix_outputs(params, cell, 8, [s[:t]], embed=embed)[0]
                    np.testing.assert_allclose(logits[t], alone[0][-1], atol=1e-5)
                    np.testing.assert_allclose(states[t], alone[1][-1], atol=1e-5)


def small_data(language: int, n: int = 64, length: int = 12, seed: int = 0):
    dfa = tomita_dfa(language)
    train = paper_balanced(dfa, n, length, np.random.default_rng(seed))
    dev = paper_balanced(dfa, n, 2 * length, np.random.default_rng(seed + 1))
    return (
        train,
        [prefix_labels(dfa, s) for s in train],
        dev,
        [prefix_labels(dfa, s) for s in dev],
    )


def test_training_keeps_the_authors_best_epoch_and_stops_early():
    """stop_threshold 0 stops at the first epoch without a new best; the parameters returned
    are those of kept_epoch (their accuracy is the history's), and on_epoch sees epoch 0."""
    from ntk_evolution.automata.rnn import prefix_outputs, train

    data = small_data(2)
    seen = []
    params, history = train(
        *data, hidden=16, max_epochs=30, stop_threshold=0, progress=False,
        on_epoch=lambda epoch, p, h: seen.append(epoch),
    )  # fmt: skip
    acc = history["test_acc"]
    assert seen == list(range(history["epochs"] + 1)) and history["epochs"] < 30
    assert acc[-1] <= max(acc[:-1]) and acc[history["best_epoch"] - 1] == max(acc)
    outputs = prefix_outputs(params, "vanilla", 16, data[2], embed=10)
    right = sum(
        int(((lg > 0) == np.array(y)).sum()) for (lg, _), y in zip(outputs, data[3], strict=True)
    )
    assert right / sum(len(y) for y in data[3]) == acc[history["kept_epoch"] - 1]


def test_training_restarts_from_fresh_initialisations_until_one_converges():
    """One epoch is too few for Tomita 5: each try is logged, the next seed is seed + 100,
    and the best try comes back."""
    from ntk_evolution.automata.rnn import train_with_restarts

    messages = []
    _, history, seed = train_with_restarts(
        *small_data(5), restarts=2, seed=3, hidden=8, max_epochs=1, progress=False,
        log=messages.append,
    )  # fmt: skip
    assert history["best_acc"] < 1 and history["epochs"] == 1 and seed in (3, 103, 203)
    assert history["init_seed"] == seed
    assert [m.split(":")[0] for m in messages] == [
        f"initialisation seed {s}" for s in (3, 103, 203)
    ]
    assert "trying a fresh initialisation" in messages[0] and "trying" not in messages[-1]


SMALL_TRAINING = "--n_train 2000 --train_length 40 --n_dev 300 --dev_length 80 --max_epochs 8"


@pytest.fixture(scope="module")
def tomita4_run(tmp_path_factory):
    """train_rnn.py on Tomita 4 at a small scale, every epoch saved."""
    import train_rnn

    run = tmp_path_factory.mktemp("tomita4")
    record = train_rnn.main(
        ["--language", "4", "--save_path", str(run), "--save_all", *SMALL_TRAINING.split()]
    )
    return run, record


@pytest.mark.slow
def test_train_and_extract_scripts_give_the_true_dfa(tomita4_run, tmp_path):
    """The paper's tagger reaches 100% held-out prefix accuracy, every epoch's file is a
    checkpoint extract_automata.py reads, and the default extraction written as JSON is the
    true DFA; every method and option writes an automaton that reads back."""
    import extract_automata
    from ntk_evolution.utils import load_pickle

    run, record = tomita4_run
    meta = record["meta"]
    assert (meta["cell"], meta["hidden"], meta["embed"]) == ("vanilla", 100, 10)
    assert meta["test_acc"] == 1.0 and (run / "training.png").exists()
    epochs = sorted(run.glob("parameters_epoch*.pkl"))
    assert len(epochs) == meta["epochs"] + 1
    assert load_pickle(str(run / "parameters_epoch0.pkl"))["meta"]["epoch"] == 0
    out = tmp_path / "dfa.json"
    report = extract_automata.main(
        ["--model_path", str(run / "parameters_final.pkl"), "--save_path", str(out)]
    )
    dfa = DFA.from_json(json.loads(out.read_text()))
    assert counterexample(dfa, tomita_dfa(4)) is None and report["equivalent_to_true_dfa"]
    assert report["test_accuracy_rnn"] == 1.0 and dfa.n_states == report["states"]
    assert np.isclose(THRESHOLD_GRID, report["threshold"]).any() and report["validation_scores"]
    check = json.loads((tmp_path / "dfa_check.json").read_text())
    assert check["states_minimized"] == 3 == check["true_states"]
    assert (tmp_path / "dfa.png").exists()
    for flags in (
        ["--method", "kmeans"], ["--method", "rpni"], ["--find_threshold"], ["--minimize"],
        ["--eval", "labels", "--seed", "3"], ["--sim_threshold", "1.01"],
    ):  # fmt: skip
        path = tmp_path / f"{'_'.join(flags).strip('-')}.json"
        report = extract_automata.main(
            ["--model_path", str(epochs[-1]), "--save_path", str(path), *flags]
        )
        dfa = DFA.from_json(json.loads(path.read_text()))
        assert dfa.n_states == report["written_states"]
        if "--sim_threshold" in flags:  # nothing merges: the prefix tree itself
            assert dfa.n_states == report["prefix_tree_nodes"] == report["states"]
        if "--minimize" in flags:
            assert dfa.n_states == report["states_minimized"] == 3


def test_extract_refuses_bad_input_in_one_line_writing_nothing(tmp_path, capsys):
    import extract_automata
    from ntk_evolution.utils import save_pickle

    save_pickle({"params": {}}, str(tmp_path / "other.pkl"))
    save_pickle({"params": {}, "meta": {"kind": "tomita_rnn"}}, str(tmp_path / "rnn.pkl"))
    out = str(tmp_path / "out" / "d.json")
    for path in (tmp_path / "other.pkl", tmp_path / "missing.pkl"):
        message = one_line_error(
            extract_automata.main, ["--model_path", str(path), "--save_path", out], capsys
        )
        assert message.startswith("error: --model_path")
    model = ["--model_path", str(tmp_path / "rnn.pkl"), "--save_path", out]
    for flag, values in {
        "--sim_threshold": ["nan", "inf", "-inf", "high"],
        "--n_strings": ["0", "-3", "2.5", "many"],
        "--train_length": ["0", "-1"],
        "--method": ["dbscan"],
        "--eval": ["both"],
    }.items():
        for value in values:
            message = one_line_error(extract_automata.main, [*model, flag, value], capsys)
            assert flag in message, message
    message = one_line_error(
        extract_automata.main, ["--model_path", str(tmp_path / "rnn.pkl"), "--save_path",
                                str(tmp_path)], capsys
    )  # fmt: skip
    assert message.startswith("error: --save_path")
    message = one_line_error(
        extract_automata.main, [*model, "--find_threshold", "--sim_threshold", "0.9"], capsys
    )
    assert "--find_threshold" in message and "--sim_threshold" in message
    assert not (tmp_path / "out").exists()


def test_the_threshold_is_cross_validated_unless_given():
    import extract_automata

    base = ["--model_path", "m.pkl", "--save_path", "d.json"]
    assert extract_automata.parse_args(base).find_threshold
    assert extract_automata.parse_args([*base, "--find_threshold"]).find_threshold
    given = extract_automata.parse_args([*base, "--sim_threshold", "0.99"])
    assert not given.find_threshold and given.sim_threshold == 0.99


def test_train_refuses_bad_input_in_one_line(tmp_path, capsys):
    import train_rnn

    base = ["--language", "4", "--save_path", str(tmp_path / "run")]
    for flag, value in (("--n_train", "0"), ("--train_length", "-2"), ("--language", "8"),
                        ("--cell", "transformer"), ("--lr", "nan"), ("--seed", "x")):  # fmt: skip
        message = one_line_error(train_rnn.main, [*base, flag, value], capsys)
        assert flag.lstrip("-") in message or "random_seed" in message, message
    assert not (tmp_path / "run").exists()


def test_help_shows_every_default(capsys):
    import extract_automata
    import train_rnn

    extract_flags = ["--sim_threshold", "--method", "--n_strings"]
    for module, flags in ((train_rnn, ["--hidden", "--cell", "--random_seed"]),
                          (extract_automata, extract_flags)):  # fmt: skip
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text
        assert text.count("(default:") >= 8


@pytest.mark.slow
def test_automata_study_writes_its_report_figures_and_results(tmp_path):
    """`make automata` in miniature (one language, small sizes): every figure, the state
    diagram, REPORT.md with each of the abstract's claims beside a verdict, and results.json
    that reads back with one row per extraction; a second run reuses the trained RNN."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "automata_study",
        os.path.join(os.path.dirname(__file__), "..", "scripts", "automata_study.py"),
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = tmp_path / "study"
    argv = ["--out", str(out), "--languages", "4", "--seeds", "2", "--epoch_seeds", "1",
            "--sizes", "2", "20", "--training", SMALL_TRAINING.replace("8", "4")]  # fmt: skip
    study.main(argv)
    for name in ("automata_data", "automata_epochs", "automata_threshold", "automata_methods",
                 "dfa_tomita4"):  # fmt: skip
        assert (out / f"{name}.png").stat().st_size > 10_000
    report = (out / "REPORT.md").read_text()
    for claim in range(1, 5):
        assert f"\n{claim}. " in report
    assert report.count("**supported**") + report.count("**not supported**") >= 2
    results = json.loads((out / "results.json").read_text())
    assert len(results["data"]) == 2 * 2 and len(results["methods"]) == 4 * 2
    assert len(results["epochs"]) == results["rnn"]["4"]["epochs"] + 1
    assert {r["method"] for r in results["methods"]} >= {"RPNI", "k-means, 20 clusters"}
    again = subprocess.run([sys.executable, spec.origin, *argv, "--sizes", "2"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert "Tomita 4: reusing" in again.stdout


def test_train_without_save_all_logs_every_epoch_and_keeps_other_files(tmp_path, capsys):
    """Without --save_all: one checkpoint, each epoch's line printed, and epoch files of an
    earlier --save_all run in the folder left alone."""
    import train_rnn
    from ntk_evolution.utils import load_pickle

    (tmp_path / "parameters_epoch7.pkl").write_bytes(b"earlier run")
    argv = ["--language", "1", "--save_path", str(tmp_path), "--n_train", "64",
            "--train_length", "8", "--n_dev", "16", "--dev_length", "8", "--max_epochs", "2",
            "--restarts", "0", "--hidden", "8"]  # fmt: skip
    record = train_rnn.main(argv)
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and f"epoch {record['meta']['epochs']}: loss" in out
    assert load_pickle(str(tmp_path / "parameters_final.pkl"))["meta"]["kind"] == "tomita_rnn"
    assert sorted(p.name for p in tmp_path.glob("parameters_*.pkl")) == [
        "parameters_epoch7.pkl", "parameters_final.pkl"
    ]  # fmt: skip
