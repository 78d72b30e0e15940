"""Automata extraction from RNNs: Tomita languages and DFA operations (languages), the recurrent
tagger and its training (rnn), state merging and its baselines (extraction), figures (plots)."""
