"""Deterministic finite automata over {0, 1}: the seven Tomita languages, uniform sampling of
their strings, minimisation, and an exact equivalence check with a shortest counterexample.

A DFA is (states 0..n-1, start, accepting set, delta[state][symbol]); it accepts a string when
the state reached from `start` is accepting. delta may be partial: an entry -1 is a missing
transition, and a string that needs one is rejected (as in the extraction of arXiv 2201.12451).
The JSON form (to_json / from_json) names states by strings and leaves missing transitions out:

    {"alphabet": ["0", "1"], "states": ["0", ...], "start": "0", "accepting": [...],
     "transitions": {"0": {"0": "1", "1": "0"}, ...}}
"""

from __future__ import annotations

import collections
import itertools
import re
from dataclasses import dataclass

import numpy as np

ALPHABET = ("0", "1")


@dataclass(frozen=True)
class DFA:
    """delta[q][a]: the state after reading symbol ALPHABET[a] in state q, -1 where missing
    (the string is rejected)."""

    n_states: int
    start: int
    accepting: frozenset[int]
    delta: tuple[tuple[int, ...], ...]

    def run(self, string: str) -> int:
        """The state reached, -1 once a missing transition is needed."""
        state = self.start
        for symbol in string:
            state = self.delta[state][ALPHABET.index(symbol)]
            if state < 0:
                return -1
        return state

    @property
    def is_total(self) -> bool:
        return all(q >= 0 for row in self.delta for q in row)

    def complete(self) -> DFA:
        """The same language with a total transition function: missing transitions go to an
        added rejecting sink state (none added when there is none missing)."""
        if self.is_total:
            return self
        sink = self.n_states
        delta = tuple(tuple(sink if q < 0 else q for q in row) for row in self.delta)
        return DFA(self.n_states + 1, self.start, self.accepting, (*delta, (sink,) * len(ALPHABET)))

    def accepts(self, string: str) -> bool:
        return self.run(string) in self.accepting

    def to_json(self) -> dict:
        names = [str(q) for q in range(self.n_states)]
        return {
            "alphabet": list(ALPHABET),
            "states": names,
            "start": names[self.start],
            "accepting": [names[q] for q in sorted(self.accepting)],
            "transitions": {
                names[q]: {
                    a: names[self.delta[q][i]]
                    for i, a in enumerate(ALPHABET)
                    if self.delta[q][i] >= 0
                }
                for q in range(self.n_states)
            },
        }

    @classmethod
    def from_json(cls, record: dict) -> DFA:
        if list(record.get("alphabet", [])) != list(ALPHABET):
            raise ValueError(f"alphabet {record.get('alphabet')!r}: expected {list(ALPHABET)}")
        names = [str(q) for q in record["states"]]
        index = {name: i for i, name in enumerate(names)}
        edges = record["transitions"]
        delta = tuple(
            tuple(index[str(edges[name][a])] if a in edges.get(name, {}) else -1 for a in ALPHABET)
            for name in names
        )
        accepting = frozenset(index[str(q)] for q in record["accepting"])
        return cls(len(names), index[str(record["start"])], accepting, delta)


def _dfa(start: int, accepting: set[int], delta: list[tuple[int, int]]) -> DFA:
    return DFA(len(delta), start, frozenset(accepting), tuple(tuple(row) for row in delta))


def _runs(string: str) -> list[tuple[str, int]]:
    return [(symbol, len(list(group))) for symbol, group in itertools.groupby(string)]


def _tomita_3(string: str) -> bool:
    """No odd-length maximal run of 1s immediately followed by an odd-length maximal run of 0s."""
    runs = _runs(string)
    return not any(
        a == "1" and m % 2 == 1 and b == "0" and n % 2 == 1
        for (a, m), (b, n) in itertools.pairwise(runs)
    )


# The definitions, as membership predicates: the specification the DFAs below are tested against.
TOMITA = {
    1: ("1*", lambda s: re.fullmatch("1*", s) is not None),
    2: ("(10)*", lambda s: re.fullmatch("(10)*", s) is not None),
    3: (
        "no odd-length run of 1s immediately followed by an odd-length run of 0s (maximal runs)",
        _tomita_3,
    ),
    4: ("no 000", lambda s: "000" not in s),
    5: ("an even number of 0s and an even number of 1s", lambda s: s.count("0") % 2 == 0
        and s.count("1") % 2 == 0),
    6: ("#0s - #1s divisible by 3", lambda s: (s.count("0") - s.count("1")) % 3 == 0),
    7: ("0*1*0*1*", lambda s: re.fullmatch("0*1*0*1*", s) is not None),
}  # fmt: skip


def tomita_dfa(language: int) -> DFA:
    """The minimal DFA of Tomita language 1..7 (states include the dead state where there is
    one). Transitions are (on 0, on 1)."""
    if language == 1:  # 0: in 1*, 1: dead
        return _dfa(0, {0}, [(1, 0), (1, 1)])
    if language == 2:  # 0: in (10)*, 1: after a 1, 2: dead
        return _dfa(0, {0}, [(2, 1), (0, 2), (2, 2)])
    if language == 3:
        # 0: clean (start, 0s not after an odd run of 1s, or an even run of 1s), 1: odd run of
        # 1s, 2: odd run of 0s after an odd run of 1s, 3: even such run, 4: dead
        return _dfa(0, {0, 1, 3}, [(0, 1), (2, 0), (3, 4), (2, 1), (4, 4)])
    if language == 4:  # trailing 0s: 0, 1, 2; 3: dead (saw 000)
        return _dfa(0, {0, 1, 2}, [(1, 0), (2, 0), (3, 0), (3, 3)])
    if language == 5:  # 2 * (#0 mod 2) + (#1 mod 2)
        return _dfa(0, {0}, [(2, 1), (3, 0), (0, 3), (1, 2)])
    if language == 6:  # (#0 - #1) mod 3
        return _dfa(0, {0}, [(1, 2), (2, 0), (0, 1)])
    if language == 7:  # phase of 0*1*0*1*; 4: dead
        return _dfa(0, {0, 1, 2, 3}, [(0, 1), (2, 1), (2, 3), (4, 3), (4, 4)])
    raise ValueError(f"Tomita language {language}: use 1 to 7")


def all_strings(length: int) -> list[str]:
    return ["".join(bits) for bits in itertools.product(ALPHABET, repeat=length)]


def count_completions(dfa: DFA, max_length: int) -> np.ndarray:
    """c[r, q, y]: the number of strings of length r that lead state q to acceptance (y = 1) or
    rejection (y = 0), as floats (exact up to 2^53)."""
    counts = np.zeros((max_length + 1, dfa.n_states, 2))
    for q in range(dfa.n_states):
        counts[0, q, int(q in dfa.accepting)] = 1
    for r in range(1, max_length + 1):
        for q in range(dfa.n_states):
            counts[r, q] = sum(counts[r - 1, dfa.delta[q][a]] for a in range(len(ALPHABET)))
    return counts


def _reachable(dfa: DFA) -> set[int]:
    """The states reachable from the start (breadth-first; missing transitions skipped)."""
    reachable, queue = {dfa.start}, collections.deque([dfa.start])
    while queue:
        for nxt in dfa.delta[queue.popleft()]:
            if nxt >= 0 and nxt not in reachable:
                reachable.add(nxt)
                queue.append(nxt)
    return reachable


def minimize(dfa: DFA) -> DFA:
    """The minimal total DFA of the same language (a partial one is completed first):
    reachable states only, then Moore's partition refinement; states renumbered in
    breadth-first order from the start (symbol 0 first)."""
    dfa = dfa.complete()
    reachable = _reachable(dfa)
    block = {q: int(q in dfa.accepting) for q in reachable}
    while True:
        signature = {q: (block[q], *(block[n] for n in dfa.delta[q])) for q in reachable}
        ids: dict[tuple, int] = {}
        refined = {q: ids.setdefault(signature[q], len(ids)) for q in sorted(reachable)}
        if len(ids) == len(set(block.values())):
            break
        block = refined
    order, queue = {block[dfa.start]: 0}, collections.deque([dfa.start])
    representative = {block[dfa.start]: dfa.start}
    while queue:
        q = queue.popleft()
        for nxt in dfa.delta[q]:
            if block[nxt] not in order:
                order[block[nxt]] = len(order)
                representative[block[nxt]] = nxt
                queue.append(nxt)
    delta = [None] * len(order)
    accepting = set()
    for b, i in order.items():
        q = representative[b]
        delta[i] = tuple(order[block[n]] for n in dfa.delta[q])
        if q in dfa.accepting:
            accepting.add(i)
    return _dfa(0, accepting, delta)


def trim(dfa: DFA) -> DFA:
    """The same language without unreachable states and without states from which no
    accepting state can be reached (transitions into them become missing); the start state
    stays. trim(minimize(dfa)) counts states as the authors' pythomata minimize().trim()
    does: the minimal DFA without its dead state."""
    reachable = _reachable(dfa)
    live = set(dfa.accepting) & reachable
    changed = True
    while changed:
        changed = False
        for q in reachable - live:
            if any(n in live for n in dfa.delta[q]):
                live.add(q)
                changed = True
    keep = sorted(live | {dfa.start})
    number = {q: i for i, q in enumerate(keep)}
    delta = tuple(tuple(number.get(n, -1) for n in dfa.delta[q]) for q in keep)
    accepting = frozenset(number[q] for q in dfa.accepting if q in number)
    return DFA(len(keep), number[dfa.start], accepting, delta)


def counterexample(a: DFA, b: DFA) -> str | None:
    """A shortest string on which a and b disagree (breadth-first search of the product
    automaton), or None when they accept the same language."""
    a, b = a.complete(), b.complete()
    start = (a.start, b.start)
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = collections.deque([start])
    while queue:
        pair = queue.popleft()
        if (pair[0] in a.accepting) != (pair[1] in b.accepting):
            symbols = []
            while parent[pair] is not None:
                pair, symbol = parent[pair]
                symbols.append(symbol)
            return "".join(reversed(symbols))
        for i, symbol in enumerate(ALPHABET):
            nxt = (a.delta[pair[0]][i], b.delta[pair[1]][i])
            if nxt not in parent:
                parent[nxt] = (pair, symbol)
                queue.append(nxt)
    return None


# ----------------------------------------------------------------------------- the paper's data
# arXiv 2201.12451's code (viking-sudo-rm/dfa-extractor, sampling.py): a balanced sample is n
# strings of one length, half drawn from the language and half uniformly at random; a test
# sample has random lengths 0..max, its first half drawn from the language. Every string is
# labelled at every prefix (the RNN is a tagger).


def sample_positive(dfa: DFA, length: int, n: int, rng: np.random.Generator) -> list[str]:
    """n strings the DFA accepts, uniform among those of `length`, or of the longest shorter
    length that has one (the authors' (10)* sampler returns "10" * (length // 2)): all n drawn
    together, one symbol per step, each symbol with probability proportional to the number of
    accepted completions after it (count_completions)."""
    counts = count_completions(dfa, length)
    while length > 0 and counts[length, dfa.start, 1] == 0:
        length -= 1
    if counts[length, dfa.start, 1] == 0:
        raise ValueError("the language accepts no string of this length or shorter")
    delta = np.array(dfa.delta)
    states = np.full(n, dfa.start)
    symbols = np.zeros((n, length), np.int8)
    for t, remaining in enumerate(range(length, 0, -1)):
        weights = counts[remaining - 1][delta[states], 1]  # (n, 2): completions after 0 or 1
        ones = rng.random(n) * weights.sum(1) >= weights[:, 0]
        symbols[:, t] = ones
        states = delta[states, ones.astype(int)]
    return ["".join(ALPHABET[a] for a in row) for row in symbols]


def uniform_strings(n: int, length: int, rng: np.random.Generator) -> list[str]:
    """n strings of `length`, each symbol uniform."""
    return ["".join(ALPHABET[a] for a in row) for row in rng.integers(0, 2, (n, length))]


def paper_balanced(dfa: DFA, n: int, length: int, rng: np.random.Generator) -> list[str]:
    """The authors' BalancedSampler: n strings of `length` (n // 2 pairs; odd n rounds up
    here), alternately drawn from the language (sample_positive) and uniformly at random."""
    half = -(-n // 2)
    positive, random = sample_positive(dfa, length, half, rng), uniform_strings(half, length, rng)
    return [s for pair in zip(positive, random, strict=True) for s in pair][:n]


def paper_test(dfa: DFA, n: int, max_length: int, rng: np.random.Generator) -> list[str]:
    """The authors' TestSampler: n strings of lengths uniform over 0..max_length, the first
    n // 2 drawn from the language, the rest uniformly at random."""
    lengths = rng.integers(0, max_length + 1, n)
    half = n // 2
    strings = [sample_positive(dfa, int(k), 1, rng)[0] for k in lengths[:half]]
    return strings + [uniform_strings(1, int(k), rng)[0] for k in lengths[half:]]


def prefix_labels(dfa: DFA, string: str) -> list[bool]:
    """Whether the DFA accepts each prefix of `string`, lengths 0..len(string), in one run
    (a missing transition rejects that prefix and every longer one)."""
    state, labels = dfa.start, [dfa.start in dfa.accepting]
    for symbol in string:
        if state >= 0:
            state = dfa.delta[state][ALPHABET.index(symbol)]
        labels.append(state in dfa.accepting)
    return labels
