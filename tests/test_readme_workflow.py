"""Every command block of the README and of the reference pages in docs/ runs as written.

The fenced blocks (the README's, then docs/'s in the map's order) are extracted and each one
is run through bash, in the state it assumes: after `python3 scripts/demo.py --quick` (the
README's quick demo) in an empty folder. A `python3` on the PATH records each script call that
bash makes (after its loops, globs and brace expansions); the calls are then run in order in
this process (imports and compiled functions shared), with the scale-down flags the README
names appended (SCALE_DOWN: later flags override earlier ones). Blocks that cannot run here
are listed in NOT_RUN_HERE with the reason; any other block that is added to a page is run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

import analyze_kernels
import calculate_kernel
import cka
import eigen_features
import eval_and_make_adv
import extract_automata
import ntk_attack
import robustify_dataset
import run_exp
import train_rnn
import visualize_ntk_features

SCRIPTS = {
    "run_exp.py": run_exp.main,
    "eval_and_make_adv.py": eval_and_make_adv.main,
    "calculate_kernel.py": calculate_kernel.main,
    "visualize_ntk_features.py": visualize_ntk_features.main,
    "analyze_kernels.py": analyze_kernels.main,
    "ntk_attack.py": ntk_attack.main,
    "eigen_features.py": eigen_features.main,
    "cka.py": cka.main,
    "robustify_dataset.py": robustify_dataset.main,
    "train_rnn.py": train_rnn.main,
    "extract_automata.py": extract_automata.main,
}

# What the README says the test appends (its "First hour" section): fewer test images and steps.
SCALE_DOWN = {
    "run_exp.py": "--standard_epochs 3 --n_test 50",
    "eval_and_make_adv.py": "--n_test 50",
    "ntk_attack.py": "--n_test 50 --pgd_steps 10",
    "eigen_features.py": "--n_test 50 --pgd_steps 5",
    "robustify_dataset.py": "--steps 10 --n_test 100",
    "cka.py": "--n_images 100",
    "train_rnn.py": "--n_train 2000 --train_length 40 --n_dev 300 --dev_length 80",
}

# Blocks (by their first line) not run here, and why.
NOT_RUN_HERE = {
    "make demo": "make targets: CI runs `make test` itself; the quick demo runs below",
    "python3 run_exp.py --standard_epochs 101": (
        "the original's six examples at CIFAR scale: tests/test_readme_examples.py runs them "
        "verbatim (scaled down) with the visualisation that follows them"
    ),
    "python3 visualize_ntk_features.py --model_path ./saved_model_path_phase_1": (
        "needs the six examples' outputs: tests/test_readme_examples.py runs it"
    ),
    "# one host, all its GPUs": "trains ResNet-18 on CIFAR-10 for 100 epochs",
    "# on host 0": "needs two hosts (tests/test_parallel.py runs this path on one machine)",
    "python3 scripts/plot_cka.py": (
        "draws the CKA project's three results: tests/test_torch_models.py runs it after them"
    ),
    "CUDA_VISIBLE_DEVICES=0 python cka.py": (
        "the CKA project's commands on its WRN-28-4 checkpoints and a RobustBench model: "
        "tests/test_torch_models.py runs them on fixture checkpoints"
    ),
}

# the python3 a README block calls: records its arguments, one JSON line per call
RECORDER = """import json, os, sys
with open(os.environ["README_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


# The reference pages, in the order of the README's map: their blocks run after the README's,
# in this order (a page's blocks may use what an earlier page's made).
DOCS = (
    "scripts", "kernels", "similarity", "reproduce", "robust_data", "automata", "running",
    "formats", "differences", "benchmarks", "layout",
)  # fmt: skip


# pages of Python blocks, run by their own test (docs/library.md: tests/test_library.py)
PYTHON_PAGES = ("library",)


def doc_pages() -> list[str]:
    return ["README.md", *(os.path.join("docs", f"{name}.md") for name in DOCS)]


def readme_blocks() -> list[str]:
    """The fenced blocks of the README, then of each page of docs/."""
    blocks = []
    for page in doc_pages():
        with open(os.path.join(ROOT, page)) as f:
            blocks += re.findall(r"^```\w*\n(.*?)^```", f.read(), re.S | re.M)
    return blocks


def test_every_page_of_docs_is_run_and_linked_from_the_readme():
    pages = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    assert pages == sorted(DOCS + PYTHON_PAGES)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in DOCS + PYTHON_PAGES:
        assert f"](docs/{name}.md)" in readme, name
    assert len(readme.splitlines()) <= 250


def skipped(block: str) -> str | None:
    first = block.strip().splitlines()[0]
    return next((why for start, why in NOT_RUN_HERE.items() if first.startswith(start)), None)


def test_every_excused_block_is_in_the_readme():
    blocks = readme_blocks()
    assert len(blocks) > len(NOT_RUN_HERE)
    for start in NOT_RUN_HERE:  # an excuse for a block that is gone would hide nothing
        assert any(b.strip().startswith(start) for b in blocks), start


def record_calls(block: str, bin_dir: str, log: str) -> list[list[str]]:
    """The script calls bash makes when it runs `block` with the recording python3 first on
    the PATH."""
    if os.path.exists(log):
        os.remove(log)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "README_CALLS": log,
    }
    subprocess.run(["bash", "-e", "-c", block], env=env, check=True)
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "scripts", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_readme_blocks_run_verbatim_after_the_quick_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_demo().main(["--quick"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "python3"
    recorder.write_text(f"#!{sys.executable}\n{RECORDER}")
    recorder.chmod(0o755)

    ran = []
    for block in readme_blocks():
        if skipped(block) is not None:
            continue
        calls = record_calls(block, str(bin_dir), str(tmp_path / "calls.jsonl"))
        assert calls, f"this README block calls no script:\n{block}"
        for argv in calls:
            script, flags = os.path.basename(argv[0]), argv[1:]
            assert script in SCRIPTS, f"README calls {argv[0]}, which this test does not know"
            SCRIPTS[script]([*flags, *shlex.split(SCALE_DOWN.get(script, ""))])
            ran.append(script)
    # the first-hour path: kernels over epochs, their evolution, eigen-features, the NTK attack
    # and its transfer, CKA, robust data
    for script in SCRIPTS:
        assert script in ran, f"no README block runs {script}"
    for png in (
        "kernel_analysis/kernel_evolution.png",
        "kernel_analysis/kernel_grid.png",
        "demo_runs/phase1_adversarial/training_curves.png",
        "demo_runs/phase1_adversarial/ntk_eig_images_class_0_300.png",
        "ntk_attack/ntk_attack_ntk.png",
        "results/cka_benign_vs_adversarial.png",
    ):
        assert (tmp_path / png).is_file(), png
    transfer = tmp_path / "demo_runs/phase1_benign/test_results_transfer_ntk.pkl"
    assert transfer.is_file()
