"""Tomita languages, DFA operations, the extraction of arXiv 2201.12451 (similarity merging of
hidden states), its baselines and the RNN scripts, against their definitions: membership
predicates, brute force over all short strings, exact equivalence, a plain transcription of
the authors' merge, torch.nn.RNN."""

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
    paper_balanced,
    paper_test,
    prefix_labels,
    sample_positive,
    sample_strings,
    side_strings,
    tomita_dfa,
    trim,
)
from ntk_evolution.extraction import (
    cosine_similarities,
    cross_validate,
    gold_labels,
    kmeans_extract,
    prefix_accuracy,
    prefix_tree,
    rpni,
    similarity_merge,
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

    from ntk_evolution.rnn import BOS, make_rnn, prefix_outputs

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

    from ntk_evolution.rnn import encode, make_rnn, prefix_outputs

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
    from ntk_evolution.rnn import prefix_outputs, train

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
    from ntk_evolution.rnn import train_with_restarts

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


def test_side_strings_are_every_string_of_that_side():
    for language in range(1, 8):
        dfa = tomita_dfa(language)
        for length in (0, 1, 5, 9):
            for label in (True, False):
                expected = [s for s in all_strings(length) if dfa.accepts(s) == label]
                assert side_strings(dfa, length, label) == expected
