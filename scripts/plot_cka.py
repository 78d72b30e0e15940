"""The CKA project's summary figure (its `python utils/plots.py`): the three analyses of its
README side by side, on one colour scale, from the pickles cka.py wrote into --savedir:

  cka.pkl              non-robust network with itself ("NonRobust-NonRobust")
  cka_adv_model.pkl    robust network with itself ("Robust-Robust")
  cka_cross_model.pkl  non-robust (rows) against robust (columns) ("NonRobust-Robust")

Writes --savedir/cka_plot.png. Other pickles: --files and --titles.

    python scripts/plot_cka.py --savedir ./results
"""

from __future__ import annotations

import argparse
import os

from ntk_evolution.cli import Parser
from ntk_evolution.similarity.plots import plot_cka_panels
from ntk_evolution.utils import UserError, load_pickle, run_main

FILES = ("cka.pkl", "cka_adv_model.pkl", "cka_cross_model.pkl")
TITLES = ("NonRobust-NonRobust", "Robust-Robust", "NonRobust-Robust")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--savedir", default="./results", help="Folder of cka.py's pickles.")
    p.add_argument("--files", nargs="+", default=list(FILES), help="Pickles, in --savedir.")
    p.add_argument("--titles", nargs="+", default=list(TITLES), help="A title per pickle.")
    p.add_argument("--out", default="cka_plot.png", help="Figure name, in --savedir.")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if len(args.titles) != len(args.files):
        raise UserError(f"--titles gives {len(args.titles)} titles for {len(args.files)} files")
    panels = []
    for name, title in zip(args.files, args.titles, strict=True):
        path = os.path.join(args.savedir, name)
        result = load_pickle(path, "cka.py result")
        if not isinstance(result, dict) or "n_images" not in result:
            raise UserError(f"{path}: not a result of cka.py (run cka.py with --savedir first)")
        panels.append((title, result))
    out = os.path.join(args.savedir, args.out)
    plot_cka_panels(panels, "CKA between layers: non-robust and robust networks", out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main)
