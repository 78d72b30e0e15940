"""The pieces of a newcomer's workflow that need no training: output names of several
checkpoints, transfer result names, progress lines in logs, metrics.csv on resume, the
compilation cache and the figures' labels."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT

import calculate_kernel
from ntk_evolution import figures, utils
from ntk_evolution.attacks.runner import default_save_name
from ntk_evolution.kernels import plots as kernel_plots
from ntk_evolution.similarity import plots as cka_plots
from ntk_evolution.training import METRICS_FIELDS, TrainingLog


def test_several_checkpoints_are_named_by_epoch_or_stem():
    paths = ["run/parameters_checkpoint_0.5.pkl", "run/parameters_checkpoint_10.pkl"]
    assert calculate_kernel.output_names(paths, [0.5, 10.0], "kernel") == [
        "kernel_epoch_0.5",
        "kernel_epoch_10",
    ]
    assert calculate_kernel.output_names(paths[:1], [0.5], "kernel") == ["kernel"]  # original's
    # unknown epoch, or two checkpoints of one folder at one epoch: the file stem
    named = calculate_kernel.output_names(["a/x.pkl", "a/final.pkl"], [None, 3.0], "k")
    assert named == ["k_x", "k_epoch_3"]
    same = calculate_kernel.output_names(["a/p.pkl", "a/q.pkl"], [3.0, 3.0], "k")
    assert same == ["k_p", "k_q"]
    # the same epoch in two folders: the outputs go to different folders
    two_runs = calculate_kernel.output_names(["a/p.pkl", "b/p.pkl"], [3.0, 3.0], "k")
    assert two_runs == ["k_epoch_3", "k_epoch_3"]


def test_transfer_results_are_named_after_their_source():
    assert default_save_name("") == "test_results"
    assert default_save_name("x/adv_examples_ntk.pkl") == "transfer_ntk"
    assert default_save_name("x/mine.pkl") == "transfer_mine"


def test_progress_prints_lines_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(utils, "LOG_INTERVAL_S", 0.05)
    for _ in utils.progress_bar(range(12), desc="long loop"):
        time.sleep(0.02)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) >= 2
    assert all(line.startswith("long loop: ") and "/12 (" in line for line in lines)
    monkeypatch.setattr(utils, "LOG_INTERVAL_S", 10.0)
    for _ in utils.progress_bar(range(3), desc="short loop"):
        pass
    assert capsys.readouterr().err == ""  # a loop shorter than the interval prints nothing


def test_metrics_log_keeps_rows_up_to_the_resume_point(tmp_path):
    path = str(tmp_path / "metrics.csv")
    log = TrainingLog(path)
    for epoch in (1, 2, 3):
        log.epoch(1, epoch, False, 0.1, {"loss": 1.0 / epoch, "accuracy": 0.5}, 2.0)
    log.test(1, 3, {"clean": 0.9, "linf": 0.5, "l2": 0.6})
    log.epoch(2, 1, True, 0.01, {"loss": 0.3, "accuracy": 0.8}, 1.0)
    resumed = TrainingLog(path, resume_at=(1, 2))  # the run was interrupted after epoch 2
    assert [(r["phase"], r["epoch"]) for r in resumed.rows] == [("1", "1"), ("1", "2")]
    resumed.epoch(1, 3, False, 0.1, {"loss": 0.3, "accuracy": 0.6}, 2.0)
    rows = TrainingLog(path, resume_at=(2, 0)).numeric()
    assert [r["wall_time_s"] for r in rows] == [2.0, 4.0, 6.0]  # cumulative across the resume
    with open(path) as f:
        assert f.readline().strip() == ",".join(METRICS_FIELDS)
    figures.plot_training_curves(log.numeric(), "test run", str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_second_run_uses_the_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    command = [
        sys.executable, "analyze_kernels.py", str(tmp_path / "none_*.pkl"),
        "--compile_cache", str(cache),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no kernel pickle matches" in done.stderr
    assert cache.is_dir()  # created before anything compiles
    script = (
        "import jax, jax.numpy as jnp, sys\n"
        "from ntk_evolution.parallel import enable_compile_cache\n"
        "enable_compile_cache(sys.argv[1])\n"
        "print(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum())\n"
    )
    subprocess.run([sys.executable, "-c", script, str(cache)], cwd=ROOT, check=True)
    entries = os.listdir(cache)
    assert entries  # the compiled function was written there
    subprocess.run([sys.executable, "-c", script, str(cache)], cwd=ROOT, check=True)
    assert sorted(os.listdir(cache)) == sorted(entries)  # and found, not compiled again


def test_kernel_title_and_class_ticks(tmp_path):
    record = {
        "kernel": np.eye(6),
        "model_path": "/x/phase1_benign/parameters_checkpoint_5.pkl",
        "epoch": 5.0,
        "model": "cnn_small",
        "dataset": "digits",
        "class_index": 0,
    }
    title = kernel_plots.kernel_title(record)
    for part in ("phase1_benign", "epoch 5", "cnn_small", "digits", "N = 6", "logit 0"):
        assert part in title
    # the run named in the checkpoint's meta wins over the folder's name (a moved checkpoint)
    assert "of renamed_run," in kernel_plots.kernel_title({**record, "run": "renamed_run"})
    labels = np.array([2, 0, 1, 0, 2, 1])
    fig, ax = figures.plt.subplots()
    kernel_plots._kernel_heatmap(ax, np.eye(6), labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert ax.get_xlabel() and ax.get_ylabel()
    figures.plt.close(fig)
    assert cka_plots.short_layer_name(3, "resnet18/~/stage1_block0/~/relu_1") == (
        "3: stage1_block0/relu_1"
    )
