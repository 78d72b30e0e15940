"""`make reproduce` over seeds: intervals against their definitions, the claims' effects against
the figures they rest on, verdicts against the rule, the report and pictures from synthetic
seeds, bad input refused before anything is written, the whole study end to end on digits (two
seeds side by side; the study on the CIFAR-format fixture is in test_reproduce_cifar.py, a file
of its own so that pytest-xdist runs the two studies side by side), and the seeds' bookkeeping
(a finished seed is not rerun) with synthetic studies."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT
from helpers import one_line_error
from scipy import stats

from ntk_evolution.study import intervals
from ntk_evolution.study.reproduction import aggregate, claim_effects, draw, flatten, write_report
from ntk_evolution.utils import UserError

SCRIPT = os.path.join(ROOT, "scripts", "reproduce.py")
TINY = (
    "--epochs 2 --phase2_epochs 1 --kernel_size 30 --kernel_epochs 0,1,2 --phase2_from 2 "
    "--attack_steps 2 --eigen_n_test 10 --aa_n_test 8 --predictor_n_test 10"
)
# the end-to-end studies: AutoAttack and the predictors' attacks on fewer images (most of a
# study's time; the images are not what is under test)
SMALL = "--aa_n_test 2 --eigen_n_test 4 --predictor_n_test 4"
SETTINGS = {
    "aa_n_test": 8, "attack_steps": 2, "dataset": "digits", "eigen_n_test": 10, "epochs": 2,
    "eps": 32.0, "kernel_epochs": "0,1,2", "kernel_size": 30, "model": "cnn_small",
    "phase2_epochs": 1, "phase2_from": "0,2", "predictor_autoattack": False,
    "predictor_n_test": 10,
}  # fmt: skip


# ----------------------------------------------------------------------------- intervals


def test_t_interval_is_its_definition():
    values = [0.61, 0.58, 0.66, 0.6]
    s = intervals.interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert s["method"] == "student-t" and s["per_seed"] == values
    np.testing.assert_allclose(s["interval"], [lo, hi], rtol=1e-12)
    assert s["mean"] == pytest.approx(np.mean(values)) and s["sd"] == pytest.approx(
        np.std(values, ddof=1)
    )


def test_bootstrap_from_enough_seeds_is_reproducible_and_brackets_the_mean():
    values = list(np.random.default_rng(3).normal(0.2, 0.1, intervals.BOOTSTRAP_FROM))
    a, b = intervals.interval(values), intervals.interval(values)
    assert a["method"] == "bootstrap-percentile" and a["interval"] == b["interval"]
    rng = np.random.default_rng(intervals.BOOTSTRAP_SEED)
    v = np.asarray(values)
    means = v[rng.integers(0, len(v), (intervals.BOOTSTRAP_RESAMPLES, len(v)))].mean(axis=1)
    np.testing.assert_allclose(a["interval"], np.quantile(means, [0.025, 0.975]))
    assert a["interval"][0] < a["mean"] < a["interval"][1]
    # narrower than the t interval's would be 0: nothing pathological; and close to it
    t = intervals.t_quantile(len(v)) * np.std(v, ddof=1) / math.sqrt(len(v))
    assert abs((a["interval"][1] - a["interval"][0]) / (2 * t) - 1) < 0.25


def test_one_seed_or_a_nan_gives_no_interval_and_no_verdict():
    for values in ([0.5], [0.5, math.nan, 0.4]):
        judged = intervals.judge(values)
        assert all(math.isnan(x) for x in judged["interval"])
        assert judged["verdict"] == "not resolved"
    assert intervals.judge([0.5])["method"] is None


@pytest.mark.parametrize(
    "values, verdict",
    [
        ([0.2, 0.25, 0.22], "holds"),
        ([-0.2, -0.25, -0.22], "contradicted"),
        ([0.0, 0.0, 0.0], "contradicted"),  # no effect at all: the claimed direction excluded
        ([0.3, -0.1, 0.05], "not resolved"),
        ([0.1, 0.1, 0.1], "holds"),
    ],
)
def test_verdict_follows_the_interval(values, verdict):
    judged = intervals.judge(values)
    assert judged["verdict"] == verdict
    lo, hi = judged["interval"]
    assert (lo > 0) == (verdict == "holds") and (hi <= 0) == (verdict == "contradicted")


def test_seeds_needed_is_the_fewest_that_would_resolve():
    judged = intervals.judge([0.05, 0.12, -0.01])
    assert judged["verdict"] == "not resolved"
    n = judged["seeds_needed"]
    mean, sd = judged["mean"], judged["sd"]

    def half(k):
        return stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)

    assert n > 3 and half(n) < abs(mean) <= half(n - 1)
    assert intervals.seeds_needed(0.0, 0.1) is None
    assert intervals.judge([0.2, 0.25, 0.22])["seeds_needed"] is None  # resolved already


# ----------------------------------------------------------------------------- synthetic seeds


def fake_results(seed: int, robust_kernel_gain: float) -> dict:
    """One seed's results in the shapes the entry scripts return, with noise."""
    rng = np.random.default_rng(seed)

    def acc(x):
        return float(np.clip(x + rng.normal(0, 0.02), 0, 1))

    def network(clean, pgd, aa, warned=False):
        return {
            "clean": acc(clean), "linf": acc(pgd), "l2": acc(pgd + 0.2),
            "aa": {"acc_dirty": acc(pgd), "acc_autoattack": acc(aa),
                   "acc_after_fab_t": acc(aa + 0.01),
                   "warnings": ["Square beat"] if warned else []},
        }  # fmt: skip

    def evolution(scale, settle):
        epochs = [0.0, 1.0, 2.0]
        rows = []
        for i, e in enumerate(epochs):
            rows.append({
                "epoch": e, "distance_to_first": scale * i / 2,
                "distance_to_last": scale * (2 - i) / 2 if e < settle else 0.0,
                "velocity": None if i == 0 else scale * (0.5 if i == 1 else 0.01),
                "alignment": acc(0.5 + 0.1 * i), "energy_top10": acc(0.9 - 0.05 * i),
            })  # fmt: skip
        return rows

    def eigen(top_robust):
        rows = [{"kind": "component", "k": k, "eigenvalue": 10.0 / k, "clean": acc(0.3),
                 "linf": acc(0.25 if 2 <= k <= 5 else 0.1)} for k in range(1, 11)]  # fmt: skip
        rows += [{"kind": "top_k", "k": k, "eigenvalue": 1.0, "clean": acc(0.8),
                  "linf": acc(top_robust)} for k in (1, 2, 5, 10, 20, 30)]  # fmt: skip
        return {"rows": rows}

    gains = {"benign": 0.0, "adversarial": robust_kernel_gain}
    phase2 = [
        (kind, e, "benign", network(0.9, 0.3 + gains[kind], 0.2 + gains[kind]))
        for kind in ("benign", "adversarial")
        for e in (0.0, 2.0)
    ]
    phase2 += [("benign", e, "adversarial", network(0.8, 0.5, 0.4, warned=seed == 1))
               for e in (0.0, 2.0)]  # fmt: skip
    return {
        "phase1": {"benign": network(0.95, 0.3, 0.2), "adversarial": network(0.9, 0.6, 0.5)},
        "evolution": {"benign": evolution(0.05, 2.0), "adversarial": evolution(0.06, 1.0)},
        "between": {"initial": 0.0, "final": 0.05},
        "phase2": phase2,
        "transfer": {
            "relu": {
                "clean": 0.8,
                "pgd": 0.3,
                "autoattack": 0.25,
                "benign_net": acc(0.6),
                "adversarial_net": acc(0.85),
            },
            "init": {"clean": 0.7, "pgd": 0.2, "benign_net": 0.7, "adversarial_net": 0.8},
            "benign_final": {"clean": 0.8, "pgd": 0.3, "benign_net": 0.5, "adversarial_net": 0.8},
        },  # fmt: skip
        "eigen": {"benign": eigen(0.3), "adversarial": eigen(0.5)},
        "cka": {
            s: {"layers0": ["conv1", "dense"], "linear": np.array([[0.9, 0.2], [0.3, 0.8]])}
            for s in ("benign_self", "benign_vs_adversarial")
        },
        "timings": {"phase 1 (2 runs)": 10.0, "CKA": 2.0},
    }


def records(n: int, gain: float = 0.2) -> list[dict]:
    out = []
    for s in range(n):
        results = fake_results(s, gain)
        out.append({"seed": s, "figures": flatten(results), "warnings": {},
                    "timings": results["timings"], "wall_s": 60.0})  # fmt: skip
    return out


def test_effects_are_the_differences_of_the_figures_they_rest_on():
    f = records(1)[0]["figures"]
    effects = {e["id"]: e["value"] for e in claim_effects(f, SETTINGS)}
    late = "phase2/benign data/{} kernel/epoch 2/{}"
    assert effects["3 PGD"] == pytest.approx(
        f[late.format("adversarial", "pgd_linf")] - f[late.format("benign", "pgd_linf")]
    )
    assert effects["3 AutoAttack"] == pytest.approx(
        f[late.format("adversarial", "autoattack")] - f[late.format("benign", "autoattack")]
    )
    best = max(f[f"phase2/adversarial data/benign kernel/epoch {e}/pgd_linf"] for e in (0, 2))
    assert effects["4 PGD"] == pytest.approx(best - f["phase1/benign/pgd_linf"])
    assert effects["2b"] == effects["7a"] == 2.0 - 1.0  # benign settles at 2, adversarial at 1
    assert effects["1a"] == pytest.approx(math.log10(0.5 / 0.01) - 1)
    assert effects["2a"] == pytest.approx(0.05 / 0.05 - 0.5)
    assert effects["5 PGD"] == pytest.approx(
        f["phase1/benign/clean"] - f["ntk_attack/relu/benign_net"]
    )
    assert effects["7b PGD"] == pytest.approx(
        f["eigen/adversarial/top_k/30/pgd"] - f["eigen/benign/top_k/30/pgd"]
    )
    ratio = [f[f"eigen/benign/component/{k}/pgd"] / f[f"eigen/benign/component/{k}/clean"]
             for k in range(2, 11)]  # fmt: skip
    assert effects["6a PGD"] == pytest.approx(np.mean(ratio[:4]) - np.mean(ratio[4:]))
    assert "6a AutoAttack" not in effects  # the predictors were attacked by PGD only


def test_aggregate_recomputes_from_the_per_seed_values():
    summary = aggregate(records(3), SETTINGS)
    assert {c["id"] for c in summary["claims"]} >= {"3 PGD", "3 AutoAttack", "4 PGD", "2b"}
    for c in summary["claims"] + list(summary["figures"].values()):
        v = np.asarray(c["per_seed"])
        assert len(v) == 3 and c["mean"] == pytest.approx(v.mean())
        if np.ptp(v) > 0:
            lo, hi = stats.t.interval(0.95, 2, loc=v.mean(), scale=stats.sem(v))
            np.testing.assert_allclose(c["interval"], [lo, hi], rtol=1e-9)
    for c in summary["claims"]:
        assert c["verdict"] == intervals.verdict(*c["interval"])
    claims = {c["id"]: c for c in summary["claims"]}
    assert claims["3 PGD"]["verdict"] == "holds"  # a 0.2 gain with 0.03 noise
    assert claims["2b"]["verdict"] == "holds" and claims["2b"]["sd"] == 0
    no_gain = {c["id"]: c for c in aggregate(records(3, gain=0.0), SETTINGS)["claims"]}
    assert no_gain["3 PGD"]["verdict"] != "holds"


def test_report_and_pictures_from_synthetic_seeds(tmp_path):
    recs = records(3)
    recs[1]["warnings"] = {"phase2/adversarial data/benign kernel/epoch 2": ["Square beat"]}
    summary = aggregate(recs, SETTINGS)
    summary |= {
        "seeds": [0, 1, 2], "settings": SETTINGS,
        "interval": {"method": "student-t"}, "seed_wall_s": [60.0] * 3,
        "warnings": {str(r["seed"]): r["warnings"] for r in recs},
        "step_names": list(recs[0]["timings"]),
        "step_minutes": [[r["seed"], list(r["timings"].values())] for r in recs],
    }  # fmt: skip
    draw(summary, SETTINGS, str(tmp_path))
    text = write_report(summary, SETTINGS, str(tmp_path), 120.0)
    assert (tmp_path / "REPORT.md").read_text() == text
    claim3 = next(c for c in summary["claims"] if c["id"] == "3 PGD")
    assert intervals.format_interval(claim3) in text and "**Verdict:**" in text
    assert "Gradient masking" in text and "seed 1, phase2/adversarial data" in text
    for name in ("claims", "kernel_evolution", "robustness", "eigen_features"):
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500


# ----------------------------------------------------------------------------- the script


def run_script(args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args.split()], cwd=cwd, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """In a real process once (exit code 2, one line on stderr), then in this one (run_main,
    what the script's __main__ calls: the same exit code and line, without starting JAX again
    per case)."""
    done = run_script("--seeds 0 --out runs", tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--seeds" in done.stderr and not (tmp_path / "runs").exists()
    monkeypatch.chdir(tmp_path)
    reproduce = load_script()
    # a folder holding seeds of other settings: refused, nothing touched
    runs = tmp_path / "other"
    runs.mkdir()
    (runs / "settings.json").write_text(json.dumps({**SETTINGS, "epochs": 5}))
    before = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    message = one_line_error(reproduce.main, f"--out {runs} {TINY}", capsys)
    assert "other settings" in message and "--epochs 5 there, 2 here" in message
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == before
    # a folder this script did not write
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    message = one_line_error(reproduce.main, f"--out {tmp_path / 'mine'}", capsys)
    assert "not written by reproduce.py" in message
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
    assert "--kernel_epochs" in one_line_error(
        reproduce.main, "--kernel_epochs 0,x --out x", capsys
    )


def check_study(out, n_seeds: int) -> dict:
    """The files of a finished study, and its summary recomputed from the per-seed values."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == list(range(n_seeds))
    for c in summary["claims"]:
        v = np.asarray(c["per_seed"], dtype=float)
        assert len(v) == n_seeds and c["mean"] == pytest.approx(v.mean())
        if np.all(np.isfinite(v)) and np.ptp(v) > 0:
            lo, hi = stats.t.interval(0.95, n_seeds - 1, loc=v.mean(), scale=stats.sem(v))
            np.testing.assert_allclose(c["interval"], [lo, hi], rtol=1e-9)
        assert c["verdict"] == intervals.verdict(*c["interval"])
    seed_figures = [
        json.loads((out / f"seed_{s}" / "figures.json").read_text())["figures"]
        for s in range(n_seeds)
    ]
    for name, s in summary["figures"].items():
        assert s["per_seed"] == pytest.approx([f[name] for f in seed_figures], nan_ok=True)
    table = (out / "figures.csv").read_text().splitlines()
    assert len(table) == len(summary["figures"]) + 1
    assert table[0].startswith("figure,seed 0")
    report = (out / "REPORT.md").read_text()
    assert "**Verdict:**" in report and "claims.png" in report
    for name in ("claims", "kernel_evolution", "robustness", "eigen_features"):
        assert matplotlib.image.imread(out / f"{name}.png").shape[0] > 300
    return summary


@pytest.mark.slow
def test_two_seeds_side_by_side_on_digits(tmp_path):
    """Seeds in processes of their own, on the small MLP (the seeds' bookkeeping is under test
    here; the study of cnn_small, on colour images, is in test_reproduce_cifar.py)."""
    out = tmp_path / "runs"
    flags = f"{TINY} {SMALL} --model mlp_skinny --n_test 100 --out {out}"
    done = run_script(f"--seeds 2 --parallel 2 {flags}", tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "seed 1: started in its own process" in done.stdout
    summary = check_study(out, 2)
    assert summary["interval"]["method"] == "student-t"
    # the seeds differ (each its own initialisation), and each was attacked by AutoAttack
    benign = summary["figures"]["phase1/benign/pgd_linf"]["per_seed"]
    assert benign[0] != benign[1]
    assert len(summary["figures"]["phase1/benign/autoattack"]["per_seed"]) == 2
    assert "fractions of the first 100 test images" in (out / "REPORT.md").read_text()
    # run again: nothing is rerun, the seeds' files are untouched
    stamps = [(out / f"seed_{s}" / "figures.json").stat().st_mtime_ns for s in (0, 1)]
    again = run_script(f"--seeds 2 {flags}", tmp_path)
    assert again.returncode == 0 and "finished already" in again.stdout
    assert "run_exp.py" not in again.stdout
    assert [(out / f"seed_{s}" / "figures.json").stat().st_mtime_ns for s in (0, 1)] == stamps


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_study_begun_before_a_setting_existed_continues_with_that_settings_old_value(tmp_path):
    """A settings.json written before --batch_size existed lacks it: the study continues with
    the value its seeds ran with (128), and is refused with another."""
    reproduce = load_script()
    settings = reproduce.settings_of(reproduce.parse_args(TINY.split()))
    older = {k: v for k, v in settings.items() if k not in reproduce.LATER_SETTINGS}
    assert settings["batch_size"] == 128 and "batch_size" not in older
    (tmp_path / "settings.json").write_text(json.dumps(older))
    reproduce.check_settings(str(tmp_path), settings)  # no error: the same study
    other = reproduce.settings_of(reproduce.parse_args([*TINY.split(), "--batch_size", "32"]))
    with pytest.raises(UserError, match="--batch_size 128 there, 32 here"):
        reproduce.check_settings(str(tmp_path), other)


def test_an_interrupted_study_continues_from_its_last_finished_seed(tmp_path, monkeypatch):
    """The seeds' bookkeeping, with each seed's study replaced by synthetic results (the real
    study is run end to end below): a finished seed is not rerun, an unfinished one is removed
    and run again."""
    reproduce = load_script()
    ran = []

    def study(args, seed, folder):
        os.makedirs(folder)
        ran.append(seed)
        return fake_results(seed, 0.2)

    monkeypatch.setattr(reproduce, "study", study)
    flags = f"{TINY} --parallel 1 --out {tmp_path / 'runs'}".split()
    reproduce.main(["--seeds", "1", *flags])
    assert ran == [0]
    seed_0 = tmp_path / "runs" / "seed_0" / "figures.json"
    stamp = seed_0.stat().st_mtime_ns
    # seed 1 was interrupted: its folder exists without figures.json
    (tmp_path / "runs" / "seed_1" / "phase1_benign").mkdir(parents=True)
    (tmp_path / "runs" / "seed_1" / "phase1_benign" / "half.pkl").write_text("")
    reproduce.main(["--seeds", "3", *flags])
    assert ran == [0, 1, 2] and seed_0.stat().st_mtime_ns == stamp
    assert not (tmp_path / "runs" / "seed_1" / "phase1_benign").exists()
    summary = check_study(tmp_path / "runs", 3)
    assert summary["figures"]["phase1/benign/clean"]["per_seed"][0] == pytest.approx(
        flatten(fake_results(0, 0.2))["phase1/benign/clean"]
    )
