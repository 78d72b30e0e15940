"""Tomita languages, DFA operations, red-blue extraction and the RNN scripts, against their
definitions: membership predicates, brute force over all short strings, exact equivalence."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from ntk_evolution.automata import (
    DFA,
    TOMITA,
    all_strings,
    balanced_strings,
    counterexample,
    minimize,
    sample_strings,
    side_strings,
    tomita_dfa,
)
from ntk_evolution.extraction import extract

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


def test_sampling_is_uniform_within_a_side():
    """Strings of length 5 without 000 (24 of 32), drawn 4800 times: each about 200 times."""
    dfa = tomita_dfa(4)
    draws = sample_strings(dfa, 5, True, 4800, np.random.default_rng(0))
    counts = collections.Counter(draws)
    assert set(counts) == {s for s in all_strings(5) if "000" not in s}
    chi2 = sum((c - 200) ** 2 / 200 for c in counts.values())
    assert chi2 < 60  # 23 degrees of freedom: p < 1e-4 above this
    assert sample_strings(tomita_dfa(2), 3, True, 5, np.random.default_rng(0)) == []


def test_balanced_strings_per_length_and_exclusion():
    dfa = tomita_dfa(2)
    rng = np.random.default_rng(0)
    train = balanced_strings(dfa, range(9), 16, rng)
    by_length = collections.defaultdict(collections.Counter)
    for s, label in train:
        assert dfa.accepts(s) == label
        by_length[len(s)][label] += 1
    # (10)* has one string of each even length (repeated to 8), none of odd ones; the empty
    # string is its only one of length 0
    for length in range(9):
        assert by_length[length][True] == (8 if length % 2 == 0 else 0)
        assert by_length[length][False] == (0 if length == 0 else 8)
    distinct_negatives = {s for s, label in train if not label and len(s) == 8}
    assert len(distinct_negatives) == 8  # drawn without repeats where there are enough
    held_out = balanced_strings(dfa, range(9), 16, rng, exclude=frozenset(s for s, _ in train))
    overlap = {s for s, _ in held_out} & {s for s, _ in train}
    # only where a side has nothing else: the positives, and the negatives of length <= 3
    assert all(dfa.accepts(s) or len(s) <= 3 for s in overlap)


def dfa_oracle(dfa: DFA, noise: float = 0.0, seed: int = 0):
    """A perfect recurrent acceptor: logits +-1 by acceptance of each prefix, hidden states the
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


@pytest.mark.parametrize("language", range(1, 8))
def test_extraction_recovers_the_dfa_behind_a_perfect_oracle(language):
    dfa = tomita_dfa(language)
    strings = [s for n in range(9) for s in all_strings(n)]
    extracted, info = extract(strings, dfa_oracle(dfa, noise=0.05))
    assert counterexample(extracted, dfa) is None
    assert extracted.n_states == dfa.n_states and info["prefix_tree_nodes"] == len(strings)


def test_too_little_data_overgeneralises_and_the_check_says_so():
    """From the three strings '', '1', '11' of Tomita 1 every prefix is accepted, so merging
    yields the one-state automaton of every string: wrong, with counterexample '0'."""
    dfa = tomita_dfa(1)
    extracted, _ = extract(["11"], dfa_oracle(dfa))
    assert extracted.n_states == 1 and counterexample(extracted, dfa) == "0"


def test_rnn_prefix_outputs_are_the_outputs_on_each_prefix():
    """Position t of a padded batch is the RNN run on the first t symbols alone."""
    import jax

    from ntk_evolution.rnn import encode, make_rnn, prefix_outputs

    for cell in ("vanilla", "gru", "lstm"):
        model = make_rnn(cell, 8)
        params = model.init(jax.random.PRNGKey(1), encode(["01"])[0])
        strings = ["0110", "1", ""]
        outputs = prefix_outputs(params, cell, 8, strings)
        for s, (logits, states) in zip(strings, outputs, strict=True):
            assert logits.shape == (len(s) + 1,)
            assert states.shape == (len(s) + 1, 16 if cell == "lstm" else 8)
            for t in range(len(s) + 1):
                alone_logits, alone_states = prefix_outputs(params, cell, 8, [s[:t]])[0]
                np.testing.assert_allclose(logits[t], alone_logits[-1], atol=1e-5)
                np.testing.assert_allclose(states[t], alone_states[-1], atol=1e-5)


@pytest.mark.slow
def test_train_and_extract_scripts_give_the_true_dfa(tmp_path):
    """Default flags on Tomita 4: the RNN converges on its held-out strings, and the extracted
    DFA written as JSON is equivalent to the true one."""
    import extract_automata
    import train_rnn

    run = tmp_path / "tomita4"
    record = train_rnn.main(["--language", "4", "--save_path", str(run)])
    assert record["meta"]["converged_epoch"] is not None and record["meta"]["test_acc"] == 1.0
    assert (run / "training.png").exists()
    out = tmp_path / "dfa.json"
    report = extract_automata.main(
        ["--model_path", str(run / "parameters_final.pkl"), "--save_path", str(out)]
    )
    dfa = DFA.from_json(json.loads(out.read_text()))
    assert counterexample(dfa, tomita_dfa(4)) is None and report["equivalent_to_true_dfa"]
    assert report["agreement_with_rnn"] > 0.99
    assert (tmp_path / "dfa.png").exists() and (tmp_path / "dfa_check.json").exists()


def test_extract_refuses_what_is_not_an_rnn_checkpoint(tmp_path, capsys):
    import extract_automata
    from utils import run_main, save_pickle

    save_pickle({"params": {}}, str(tmp_path / "other.pkl"))
    for path in (tmp_path / "other.pkl", tmp_path / "missing.pkl"):
        with pytest.raises(SystemExit) as exit_info:
            run_main(
                extract_automata.main,
                ["--model_path", str(path), "--save_path", str(tmp_path / "d.json")],
            )
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("error: --model_path") and "\n" not in message


def test_training_restarts_from_fresh_initialisations_until_one_converges():
    """One epoch is too few for Tomita 5: each try is logged, the next seed is seed + 100,
    and the last try comes back with converged_epoch None."""
    from ntk_evolution.automata import tomita_data
    from ntk_evolution.rnn import train_with_restarts

    train_data, test_data = tomita_data(5, 6, 8, 16, seed=0)
    messages = []
    _, history, seed = train_with_restarts(
        train_data, test_data, restarts=2, seed=3, hidden=8, max_epochs=1, progress=False,
        log=messages.append,
    )  # fmt: skip
    assert seed == 203 and history["converged_epoch"] is None and history["epochs"] == 1
    assert [m.split(":")[0] for m in messages] == [
        f"initialisation seed {s}" for s in (3, 103, 203)
    ]
    assert "trying a fresh initialisation" in messages[0] and "trying" not in messages[-1]


def test_side_strings_are_every_string_of_that_side():
    for language in range(1, 8):
        dfa = tomita_dfa(language)
        for length in (0, 1, 5, 9):
            for label in (True, False):
                expected = [s for s in all_strings(length) if dfa.accepts(s) == label]
                assert side_strings(dfa, length, label) == expected


def test_held_out_accuracy_reaches_exactly_one():
    """Tomita 1 converges within a few epochs on 1312 held-out strings: the accuracy is counted
    in integers, so 100% reads 1.0 (a float32 mean read 0.99999994 and never converged)."""
    from ntk_evolution.automata import tomita_data
    from ntk_evolution.rnn import train

    train_data, test_data = tomita_data(1, 14, 20, 64, seed=0)
    assert len(test_data) == 1312
    _, history = train(train_data, test_data, max_epochs=30, progress=False)
    assert history["converged_epoch"] is not None and history["test_acc"][-1] == 1.0
