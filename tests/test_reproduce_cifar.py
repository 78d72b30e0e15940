"""`make reproduce`'s whole study on the CIFAR-format fixture (one seed, after an interrupted
start). A file of its own: pytest-xdist gives each file to one worker, and this study and the
two seeds of test_reproduce.py are the suite's two longest tests."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_cifar10_fixture
from test_reproduce import SMALL, TINY, check_study, load_script


@pytest.mark.slow
def test_cifar_study_after_an_interrupted_start(tmp_path, monkeypatch, capsys, skip_cifar_md5):
    monkeypatch.chdir(tmp_path)
    write_cifar10_fixture("data", n_train=50, n_test=8)  # 5 per class, in 2 batches of 25
    reproduce = load_script()
    flags = (
        f"--seeds 1 --dataset cifar10 --data_root data {TINY} {SMALL} --batch_size 25 --out runs"
    ).split()
    out = tmp_path / "runs"
    # an earlier start with these settings was interrupted inside seed 0
    (out / "seed_0" / "phase1_benign").mkdir(parents=True)
    (out / "settings.json").write_text(
        json.dumps(reproduce.settings_of(reproduce.parse_args(flags)))
    )
    reproduce.main(flags)
    assert "removing the unfinished run" in capsys.readouterr().out
    summary = check_study(out, 1)
    assert summary["interval"]["method"] is None  # one seed: no interval, nothing resolved
    assert {c["verdict"] for c in summary["claims"]} == {"not resolved"}
    figures = summary["figures"]
    assert figures["phase1/benign/clean"]["per_seed"][0] >= 0.0
    assert math.isfinite(figures["phase1/adversarial/autoattack"]["per_seed"][0])
    assert "cifar10" in (out / "REPORT.md").read_text()
    # run again: nothing is rerun
    stamp = (out / "seed_0" / "figures.json").stat().st_mtime_ns
    reproduce.main(flags)
    assert "seeds [0] finished already" in capsys.readouterr().out
    assert (out / "seed_0" / "figures.json").stat().st_mtime_ns == stamp
