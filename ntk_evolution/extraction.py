"""A finite automaton from a recurrent acceptor by state merging (blue-fringe, as in RPNI and
the red-blue framework of grammatical inference), its outputs and hidden states as the oracle.

1. Prefix tree: one node per distinct prefix of the sample strings, labelled by the RNN's
   output on that prefix (logit > 0: accept) and holding its hidden state h(prefix).
2. Red-blue merging: red nodes are the automaton's states so far (the root first), blue nodes
   the children of red nodes that are not red. The shortest blue node (then lexicographic) is
   tried against every red node, nearest hidden state first: merging redirects its incoming
   edge to the red node and folds its subtree into the automaton, and is kept when no two
   folded nodes disagree on accept/reject (and, with max_distance, when the two hidden states
   are within it). A blue node that merges with no red node turns red.
3. A transition the sample never takes from a red state goes where the RNN goes: to the red
   state whose hidden state is nearest the RNN's state after that symbol, among those with the
   RNN's label.
4. Minimisation (automata.minimize).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ntk_evolution.automata import ALPHABET, DFA, minimize

Oracle = Callable[[Sequence[str]], list[tuple[np.ndarray, np.ndarray]]]


@dataclass
class PrefixTree:
    """Node i is the prefix strings[i]: children[i][a] (-1 where absent), label[i] (the RNN's
    accept/reject), states[i] (its hidden state)."""

    strings: list[str]
    children: list[list[int]]
    label: np.ndarray
    states: np.ndarray


def prefix_tree(strings: Sequence[str], oracle: Oracle) -> PrefixTree:
    """The prefix tree of `strings`, labelled and annotated by oracle (rnn.prefix_outputs:
    per string, logits and hidden states at every prefix)."""
    outputs = oracle(strings) if strings else oracle([""])  # the root: the empty string
    index = {"": 0}
    nodes, children = [""], [[-1, -1]]
    labels, states = [outputs[0][0][0] > 0], [outputs[0][1][0]]
    for string, (logits, hidden) in zip(strings, outputs, strict=True):
        node = 0
        for t, symbol in enumerate(string, start=1):
            prefix = string[:t]
            if prefix not in index:
                index[prefix] = len(nodes)
                nodes.append(prefix)
                children.append([-1, -1])
                labels.append(logits[t] > 0)
                states.append(hidden[t])
                children[node][ALPHABET.index(symbol)] = index[prefix]
            node = index[prefix]
    return PrefixTree(nodes, children, np.array(labels, bool), np.stack(states))


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


def red_blue(
    tree: PrefixTree, max_distance: float | None = None
) -> tuple[list[int], dict[int, tuple[int, ...]]]:
    """Red-blue state merging on the prefix tree: (red nodes, transitions among them, -1 where
    the sample never goes)."""
    trans = {i: tuple(c) for i, c in enumerate(tree.children)}
    label = {i: bool(v) for i, v in enumerate(tree.label)}
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
            return red, {r: trans[r] for r in red}
        b, parent, a = min(blue, key=lambda item: order[tree.strings[item[0]]])
        distances = np.linalg.norm(tree.states[red] - tree.states[b], axis=1)
        for k in np.argsort(distances, kind="stable"):
            if max_distance is not None and distances[k] > max_distance:
                break
            new_trans, new_label = dict(trans), dict(label)
            edges = list(new_trans[parent])
            edges[a] = red[k]
            new_trans[parent] = tuple(edges)
            if _fold(new_trans, new_label, red[k], b):
                trans, label = new_trans, new_label
                break
        else:
            red.append(b)


def extract(
    strings: Sequence[str], oracle: Oracle, max_distance: float | None = None
) -> tuple[DFA, dict]:
    """The minimal DFA extracted from the RNN behind `oracle` on the sample `strings`, and
    facts about the extraction (prefix-tree size, red states, transitions the RNN completed)."""
    return extract_from_tree(prefix_tree(strings, oracle), oracle, max_distance)


def extract_from_tree(
    tree: PrefixTree, oracle: Oracle, max_distance: float | None = None
) -> tuple[DFA, dict]:
    """extract() from a prefix tree already built (the oracle answers only the transitions
    the sample never takes)."""
    red, trans = red_blue(tree, max_distance)
    number = {node: i for i, node in enumerate(red)}
    missing = [(r, a) for r in red for a in range(len(ALPHABET)) if trans[r][a] < 0]
    completed = {}
    if missing:
        queries = [tree.strings[r] + ALPHABET[a] for r, a in missing]
        for (r, a), (logits, hidden) in zip(missing, oracle(queries), strict=True):
            same = [q for q in red if tree.label[q] == (logits[-1] > 0)] or red
            distances = np.linalg.norm(tree.states[same] - hidden[-1], axis=1)
            completed[(r, a)] = same[int(np.argmin(distances))]
    delta = [
        tuple(
            number[trans[r][a] if trans[r][a] >= 0 else completed[(r, a)]]
            for a in range(len(ALPHABET))
        )
        for r in red
    ]
    accepting = frozenset(number[r] for r in red if tree.label[r])
    raw = DFA(len(red), 0, accepting, tuple(delta))
    info = {
        "prefix_tree_nodes": len(tree.strings),
        "red_states": len(red),
        "completed_transitions": len(completed),
    }
    return minimize(raw), info


def agreement(dfa: DFA, oracle: Oracle, strings: Sequence[str]) -> float:
    """Share of `strings` on which the DFA and the RNN (its last logit) agree."""
    outputs = oracle(strings)
    same = [
        dfa.accepts(s) == (logits[-1] > 0) for s, (logits, _) in zip(strings, outputs, strict=True)
    ]
    return float(np.mean(same))
