"""Finite automata from recurrent taggers (ntk_evolution.rnn) on a sample of strings.

The method of arXiv 2201.12451, as its code does it (viking-sudo-rm/dfa-extractor:
extract_dfa.py, automaton.py, trie.py, kmeans_baseline.py):

1. prefix_tree: one node per distinct prefix of the sample, numbered in order of first
   appearance (their trie), each with the RNN's hidden state there, the RNN's prediction and
   the true label.
2. similarity_merge: for i = 0, 1, ... and j = 0..i-1, in that order, nodes j and i are merged
   when their true labels agree (their states_mask) and the cosine similarity of their hidden
   states (computed once, on the tree) exceeds the threshold. Merging is their single-pair
   merge: edges into j go to i, j's edges that i lacks are added to i (i keeps its own on a
   conflict: no recursive fold), j disappears (i becomes the start if j was). A pair whose
   node is already gone is skipped. A node accepts by its label under `--eval` (the RNN's
   prediction, or the true label); a transition missing at the end rejects.
3. cross_validate (--find_threshold): the thresholds 0.925, 0.930, ..., 0.995, each scored by
   the accuracy of every prefix of a validation sample; the first best wins.

Baselines: kmeans (their kmeans_baseline.py: k-means on every position's hidden state, each
cluster a state; accepting by majority label, transitions by majority vote, the start by
majority over the empty prefix), and rpni (red-blue state merging with a label-consistency
check; it reads the RNN's labels only, never its hidden states).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ntk_evolution.automata.languages import ALPHABET, DFA, prefix_labels

Oracle = Callable[[Sequence[str]], list[tuple[np.ndarray, np.ndarray]]]
METHODS = ("similarity", "kmeans", "rpni")
EVALS = ("preds", "labels")
THRESHOLD_GRID = np.arange(0.925, 1.0, 0.005)  # the authors' cross_validate(.925, 1.)


@dataclass
class PrefixTree:
    """Node i is the prefix strings[i]; children[i][a] (-1 where absent); predicted[i] (the
    RNN's logit > 0), true[i] (the language's label), states[i] (the RNN's hidden state)."""

    strings: list[str]
    children: list[list[int]]
    predicted: np.ndarray
    true: np.ndarray
    states: np.ndarray

    def label(self, eval_on: str) -> np.ndarray:
        """The node labels the automaton takes: the RNN's ('preds') or the true ('labels')."""
        return {"preds": self.predicted, "labels": self.true}[eval_on]


def prefix_tree(strings: Sequence[str], outputs, truth: DFA) -> PrefixTree:
    """The prefix tree of `strings`, given the RNN's outputs on them (rnn.prefix_outputs: per
    string, logits and hidden states at every prefix) and the true DFA."""
    if not strings:
        raise ValueError("no strings to build a prefix tree from")
    index = {"": 0}
    nodes, children = [""], [[-1, -1]]
    predicted, states = [outputs[0][0][0] > 0], [outputs[0][1][0]]
    for string, (logits, hidden) in zip(strings, outputs, strict=True):
        node = 0
        for t, symbol in enumerate(string, start=1):
            prefix = string[:t]
            if prefix not in index:
                index[prefix] = len(nodes)
                nodes.append(prefix)
                children.append([-1, -1])
                predicted.append(logits[t] > 0)
                states.append(hidden[t])
                children[node][ALPHABET.index(symbol)] = index[prefix]
            node = index[prefix]
    true = np.array([truth.accepts(s) for s in nodes], bool)
    return PrefixTree(nodes, children, np.array(predicted, bool), true, np.stack(states))


def cosine_similarities(states: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(n, n) cosine similarities, torch.nn.CosineSimilarity's formula (the norms' product
    clamped at eps)."""
    x = np.asarray(states, np.float64)
    norms = np.linalg.norm(x, axis=1)
    return (x @ x.T) / np.maximum(np.outer(norms, norms), eps)


def _to_dfa(alive: list[int], start: int, edges: dict, accepting: np.ndarray) -> DFA:
    number = {q: i for i, q in enumerate(alive)}
    delta = tuple(
        tuple(number[edges[q][a]] if a in edges[q] else -1 for a in range(len(ALPHABET)))
        for q in alive
    )
    final = frozenset(number[q] for q in alive if accepting[q])
    return DFA(len(alive), number[start], final, delta)


def similarity_merge(
    tree: PrefixTree, threshold: float, eval_on: str = "preds", similarity=None
) -> DFA:
    """The authors' cosine_merging on the prefix tree (module docstring, step 2); states keep
    the order of the tree's nodes. similarity: cosine_similarities(tree.states), when already
    computed."""
    n = len(tree.strings)
    sim = cosine_similarities(tree.states) if similarity is None else similarity
    candidate = (sim > threshold) & (tree.true[:, None] == tree.true[None, :])
    edges = {q: {a: c for a, c in enumerate(row) if c >= 0} for q, row in enumerate(tree.children)}
    incoming = {q: set() for q in range(n)}  # (source, symbol) pairs pointing at q
    for q, row in edges.items():
        for a, c in row.items():
            incoming[c].add((q, a))
    alive = np.ones(n, bool)
    start = 0
    for i in range(1, n):
        for j in np.flatnonzero(candidate[i, :i] & alive[:i]):
            for source, a in incoming.pop(j):  # edges into j now go to i
                edges[source][a] = i
                incoming[i].add((source, a))
            for a, target in edges.pop(j).items():  # j's edges that i lacks
                incoming[target].discard((j, a))
                if target == j:
                    target = i
                if a not in edges[i]:
                    edges[i][a] = target
                    incoming[target].add((i, a))
            alive[j] = False
            if start == j:
                start = i
    return _to_dfa(list(np.flatnonzero(alive)), start, edges, tree.label(eval_on))


def prefix_accuracy(dfa: DFA, strings: Sequence[str], gold: Sequence[Sequence[bool]]) -> float:
    """The authors' score_all_prefixes: the share of all prefixes (lengths 0..len) of the
    strings that the DFA labels as `gold` does."""
    right = total = 0
    for string, labels in zip(strings, gold, strict=True):
        said = prefix_labels(dfa, string)
        right += sum(a == bool(b) for a, b in zip(said, labels[: len(said)], strict=True))
        total += len(said)
    return right / total


def word_accuracy(dfa: DFA, strings: Sequence[str], gold: Sequence[bool]) -> float:
    """The authors' score_whole_words: the share of strings the DFA labels as `gold` does."""
    return float(np.mean([dfa.accepts(s) == bool(y) for s, y in zip(strings, gold, strict=True)]))


def cross_validate(
    tree: PrefixTree,
    eval_on: str,
    val_strings: Sequence[str],
    val_gold: Sequence[Sequence[bool]],
    grid: Sequence[float] = THRESHOLD_GRID,
    similarity=None,
) -> tuple[DFA, float, list[float]]:
    """The authors' cross_validate: similarity_merge at each threshold of the grid, scored by
    prefix_accuracy on the validation strings; (the first best DFA, its threshold, every
    threshold's score). similarity: cosine_similarities(tree.states), when already computed."""
    sim = cosine_similarities(tree.states) if similarity is None else similarity
    best, scores = None, []
    for threshold in grid:
        dfa = similarity_merge(tree, float(threshold), eval_on, sim)
        scores.append(prefix_accuracy(dfa, val_strings, val_gold))
        if best is None or scores[-1] > best[2]:
            best = (dfa, float(threshold), scores[-1])
    return best[0], best[1], scores


def kmeans_extract(
    strings: Sequence[str],
    outputs,
    gold: Sequence[Sequence[bool]],
    n_clusters: int = 20,
    seed: int = 0,
) -> DFA:
    """The authors' KmeansExtractor: k-means (scikit-learn, 10 initialisations) on the hidden
    states at every position of every string (shared prefixes counted once per string, as
    theirs); cluster c accepts when more than half its positions' gold labels do; the start is
    the most common cluster of the empty prefix; the transition (c, a) goes to the most
    common cluster after reading a from c (ties: the lowest cluster), missing when never
    seen."""
    from sklearn.cluster import KMeans

    states = np.concatenate([hidden for _, hidden in outputs])
    labels = np.concatenate(
        [np.asarray(g[: len(s) + 1], bool) for s, g in zip(strings, gold, strict=True)]
    )
    k = min(n_clusters, len(np.unique(states, axis=0)))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(states)
    votes: dict[tuple[int, int], list[int]] = {}
    starts, offset = [], 0
    for string in strings:
        path = clusters[offset : offset + len(string) + 1]
        starts.append(path[0])
        for t, symbol in enumerate(string):
            votes.setdefault((path[t], ALPHABET.index(symbol)), []).append(path[t + 1])
        offset += len(string) + 1

    def majority(values):
        return int(np.argmax(np.bincount(values, minlength=k)))

    edges = {q: {} for q in range(k)}
    for (q, a), values in votes.items():
        edges[q][a] = majority(values)
    accept = np.array([labels[clusters == c].mean() > 0.5 for c in range(k)])
    return _to_dfa(list(range(k)), majority(starts), edges, accept)


def _fold(trans: dict, label: dict, red: int, blue: int) -> bool:
    """Fold the tree rooted at `blue` into the automaton at `red` (in place); False on a
    conflict of labels."""
    stack = [(red, blue)]
    while stack:
        q, b = stack.pop()
        if label[q] != label[b]:
            return False
        tq = list(trans[q])
        for a in range(len(ALPHABET)):
            child = trans[b][a]
            if child < 0:
                continue
            if tq[a] < 0:
                tq[a] = child  # graft b's subtree under q
            else:
                stack.append((tq[a], child))
        trans[q] = tuple(tq)
    return True


def rpni(tree: PrefixTree, eval_on: str = "preds") -> DFA:
    """Red-blue state merging (RPNI's order): red nodes are the automaton's states (the root
    first), blue nodes the children of red ones; the shortest blue node (then lexicographic)
    is tried against each red node in the order they turned red, and merged into the first
    with which folding its subtree meets no accept/reject conflict; otherwise it turns red.
    Only the labels are read (never the hidden states); a transition the sample never takes
    is missing (rejects)."""
    trans = {i: tuple(c) for i, c in enumerate(tree.children)}
    label = {i: bool(v) for i, v in enumerate(tree.label(eval_on))}
    red = [0]
    order = {s: i for i, s in enumerate(sorted(tree.strings, key=lambda s: (len(s), s)))}
    while True:
        blue = [
            (child, r, a)
            for r in red
            for a, child in enumerate(trans[r])
            if child >= 0 and child not in red
        ]
        if not blue:
            break
        b, parent, a = min(blue, key=lambda item: order[tree.strings[item[0]]])
        for r in red:
            new_trans, new_label = dict(trans), dict(label)
            edges = list(new_trans[parent])
            edges[a] = r
            new_trans[parent] = tuple(edges)
            if _fold(new_trans, new_label, r, b):
                trans, label = new_trans, new_label
                break
        else:
            red.append(b)
    edges = {r: {a: c for a, c in enumerate(trans[r]) if c >= 0} for r in red}
    accepting = np.zeros(len(tree.strings), bool)
    accepting[red] = [label[r] for r in red]
    return _to_dfa(red, 0, edges, accepting)


def gold_labels(outputs, strings: Sequence[str], truth: DFA, eval_on: str) -> list[list[bool]]:
    """Per string, the label of every prefix: the RNN's (logit > 0) or the true one."""
    if eval_on == "preds":
        return [list(np.asarray(logits) > 0) for logits, _ in outputs]
    return [prefix_labels(truth, s) for s in strings]
