"""`make reproduce` over seeds: intervals over seeds (intervals), the claims and their verdicts
(reproduction), report helpers (reports), figures (plots)."""
