"""Safe loading, atomic writes, resume, determinism and one-line errors for bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT
from helpers import one_line_error

import calculate_kernel
import eval_and_make_adv
import run_exp
import visualize_ntk_features
from ntk_evolution import experiment, run_lock
from ntk_evolution.run_lock import LOCK_FILE
from ntk_evolution.utils import UserError, load_pickle, run_main, save_pickle

DIGITS = "--dataset digits --model cnn_small"


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# files that differ between identical runs, and why (each is checked otherwise)
NOT_BYTE_COMPARED = {
    "metrics.csv": "holds wall times (untimed_metrics compares the rest)",
    "training_curves.png": "its title names the run's folder",
}


def digest(folder) -> dict:
    """sha256 of every file in `folder` but those in NOT_BYTE_COMPARED."""
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name)) and name not in NOT_BYTE_COMPARED
    }


# ----------------------------------------------------------------------------- safe loading


def test_pickle_that_would_run_a_command_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"params": RunsACommand(marker)}))
    with pytest.raises(UserError, match="refusing.*--trust_pickle"):
        load_pickle(str(evil))
    with pytest.raises(SystemExit) as exit_info:
        run_main(eval_and_make_adv.main, shlex.split(f"--model_path {evil} {DIGITS}"))
    assert exit_info.value.code == 2
    assert not marker.exists()


def test_everything_we_write_loads_safely(tmp_path):
    import jax.numpy as jnp

    record = {
        "params": {"layer": {"w": jnp.ones((2, 3)), "b": np.zeros(3, np.float32)}},
        "scalars": [np.float64(1.5), np.int32(2), 3, 4.0, None, True, "text", (1, 2)],
        "labels": np.arange(5),
    }
    path = str(tmp_path / "record.pkl")
    save_pickle(record, path)
    loaded = load_pickle(path)
    assert isinstance(loaded["params"]["layer"]["w"], np.ndarray)  # JAX arrays were converted
    np.testing.assert_array_equal(loaded["params"]["layer"]["w"], 1.0)
    assert loaded["scalars"][:4] == [1.5, 2, 3, 4.0]


# ----------------------------------------------------------------------------- atomic writes

SLOW_WRITER = """
import os, time
import numpy as np
from ntk_evolution import utils
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(60)  # a slow disk: the data is in the temporary file, not yet renamed
os.fsync = slow_fsync
utils.save_pickle({{"params": np.full(1000, 2.0)}}, {path!r})
"""


def test_writer_killed_mid_save_leaves_the_previous_file_intact(tmp_path):
    path = str(tmp_path / "parameters_final.pkl")
    save_pickle({"params": np.full(1000, 1.0)}, path)
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER.format(path=path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    np.testing.assert_array_equal(load_pickle(path)["params"], 1.0)


def test_failed_save_raises_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "results.pkl")
    save_pickle({"clean": 0.5}, path)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match="could not save .*No space left on device"):
        save_pickle({"clean": 0.9}, path)
    monkeypatch.undo()
    assert load_pickle(path) == {"clean": 0.5}
    assert os.listdir(tmp_path) == ["results.pkl"]  # no temporary file left behind


# ----------------------------------------------------------------------------- resume, determinism

# on the first 512 training images (4 steps per epoch): what is under test is the run's files,
# not how much it learns
RUN = (
    f"{DIGITS} --loaders AC --standard_epochs 2 --linear_epochs 2 --centering --eps 32 "
    "--n_test 30 --n_train 512 --save_models --random_seed 3"
)


class Interrupt(Exception):
    pass


def run_in(folder, extra=""):
    return run_exp.main(shlex.split(f"{RUN} --save_path {folder} {extra}"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    # every run of these tests is in a folder named "run" (the run's name, in its checkpoints'
    # meta), so that their files can be compared byte for byte
    folder = tmp_path_factory.mktemp("reference") / "run"
    return folder, run_in(folder)


@pytest.mark.slow
def test_same_command_and_seed_give_identical_outputs(reference_run, tmp_path):
    folder, results = reference_run
    assert run_in(tmp_path / "run") == results
    assert digest(folder) == digest(tmp_path / "run")  # every file, byte for byte
    assert untimed_metrics(folder) == untimed_metrics(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("interrupt_at_epoch_call", [2, 3])  # phase 1 epoch 2, phase 2 epoch 1
def test_interrupted_run_resumes_to_identical_results(
    reference_run, tmp_path, monkeypatch, interrupt_at_epoch_call
):
    folder, results = reference_run
    real_run_epoch = experiment.run_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupt_at_epoch_call:
            raise Interrupt()
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_epoch", interrupted)
    with pytest.raises(Interrupt):
        run_in(tmp_path / "run")
    monkeypatch.setattr(experiment, "run_epoch", real_run_epoch)
    assert not os.path.exists(tmp_path / "run" / "results.pkl")
    assert run_in(tmp_path / "run", "--resume") == results
    for name in ("results.pkl", "parameters_final.pkl"):
        expected = open(folder / name, "rb").read()
        assert open(tmp_path / "run" / name, "rb").read() == expected, name
    # metrics.csv: the resumed run appended to the interrupted one's rows; the same rows as
    # the uninterrupted run's but for the times
    expected = untimed_metrics(folder)
    assert untimed_metrics(tmp_path / "run") == expected and len(expected) > 2
    assert (tmp_path / "run" / "training_curves.png").is_file()


# python, with Ctrl-C at its default as in a terminal, even when these tests run in a background
# job (whose children start with SIGINT ignored, so that Python would not raise
# KeyboardInterrupt): the default survives the exec
WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]


def start_run(save_path, cwd):
    """RUN into `save_path` in a process of its own."""
    command = [*WITH_CTRL_C, os.path.join(ROOT, "run_exp.py"), *shlex.split(RUN)]
    return subprocess.Popen(
        [*command, "--save_path", str(save_path)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, code, cause",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["ctrl_c", "sigterm"],
)
def test_ctrl_c_or_sigterm_in_a_real_process_says_how_to_resume_and_resuming_is_identical(
    reference_run, tmp_path, sig, code, cause
):
    """Ctrl-C, and SIGTERM as a scheduler preempts a job: one line, the last complete epoch
    kept, and --resume gives byte-identical results to the uninterrupted run."""
    folder, results = reference_run
    save_path = tmp_path / "run"
    process = start_run(save_path, tmp_path)
    state_path = save_path / "resume_state.pkl"
    deadline = time.time() + 300
    while not state_path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before its first epoch was saved"
    process.send_signal(sig)  # after phase 1 epoch 1 is saved
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(cause)]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert lines[0].startswith(f"{cause} at phase ")
    assert lines[0].endswith(
        "; the last complete epoch is saved; run the same command with --resume to continue"
    )
    assert not (save_path / "results.pkl").exists()
    state = load_pickle(str(state_path))  # intact, and loadable by the resume
    assert (state["phase"], state["epoch"]) >= (1, 1)
    assert run_in(save_path, "--resume") == results
    for name in ("results.pkl", "parameters_final.pkl"):
        expected = open(folder / name, "rb").read()
        assert open(save_path / name, "rb").read() == expected, name


# ----------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_second_run_into_a_running_runs_folder_is_refused_and_the_first_is_untouched(
    reference_run, tmp_path
):
    folder, results = reference_run
    save_path = tmp_path / "run"
    first = start_run(save_path, tmp_path)
    lock = save_path / LOCK_FILE
    deadline = time.time() + 300
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, whatever the machine's speed
    try:
        second = start_run(save_path, tmp_path)
        _, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --save_path {save_path} is in use by another run_exp.py ")
    assert f"pid {first.pid} on host {socket.gethostname()}" in err
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert digest(save_path) == digest(folder)  # byte for byte the uninterrupted run's files
    assert not lock.exists()  # released at the end: a later run into the folder may start


def test_a_lock_held_elsewhere_is_named_and_nothing_is_written(tmp_path, capsys):
    save_path = tmp_path / "held"
    save_path.mkdir()
    fd = run_lock.acquire(str(save_path), "--save_path", ["--the", "other", "run"])
    try:
        message = one_line_error(
            run_exp.main,
            f"{DIGITS} --standard_epochs 1 --linear_epochs 0 --save_path {save_path}",
            capsys,
        )
        who = f"(pid {os.getpid()} on host {socket.gethostname()}"
        assert f"is in use by another run_exp.py {who}" in message
        assert sorted(os.listdir(save_path)) == [LOCK_FILE]
        holder = json.loads((save_path / LOCK_FILE).read_text())
        assert holder["command"] == "run_exp.py --the other run"  # not overwritten
    finally:
        run_lock.release(fd, str(save_path))
    assert os.listdir(save_path) == []


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    save_path = tmp_path / "left"
    save_path.mkdir()
    left = {"pid": 999999, "host": "node17", "started": "2026-12-01T10:00:00+00:00"}
    (save_path / LOCK_FILE).write_text(json.dumps(left))  # the file, but nobody holds the lock
    run_exp.main(
        shlex.split(
            f"{DIGITS} --standard_epochs 1 --linear_epochs 0 --skip_first_test "
            f"--skip_second_test --save_path {save_path}"
        )
    )
    out = capsys.readouterr().out
    assert "note: taking over" in out and "pid 999999 on host node17" in out
    assert (save_path / "results.pkl").is_file() and not (save_path / LOCK_FILE).exists()
    # runs one after another into one folder stay allowed (the README's examples 1 and 2 do
    # it: test_readme_examples.py)


def untimed_metrics(folder) -> list[dict]:
    """metrics.csv's rows without the wall-time columns."""
    with open(folder / "metrics.csv", newline="") as f:
        return [
            {k: v for k, v in row.items() if not k.endswith("time_s")} for row in csv.DictReader(f)
        ]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run_exp.main(
        shlex.split(
            f"{DIGITS} --standard_epochs 1 --linear_epochs 0 --save_models --constant_save "
            f"--skip_first_test --skip_second_test --save_path {folder}"
        )
    )
    return folder


def test_bad_inputs_get_one_line_and_exit_code_2(digits_run, tmp_path, capsys):
    ckpt = f"{digits_run}/parameters_final.pkl"
    before = digest(digits_run)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a pickle")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(open(ckpt, "rb").read()[:500])
    legacy = str(tmp_path / "legacy.pkl")  # as written before checkpoints had a meta entry
    save_pickle({k: v for k, v in load_pickle(ckpt).items() if k != "meta"}, legacy)
    cases = [
        (eval_and_make_adv.main, f"--model_path {tmp_path}/missing.pkl {DIGITS}", "not found"),
        (eval_and_make_adv.main, f"--model_path {tmp_path} {DIGITS}", "not found"),
        (eval_and_make_adv.main, f"--model_path {text_file} {DIGITS}", "not a valid"),
        (eval_and_make_adv.main, f"--model_path {truncated} {DIGITS}", "not a valid"),
        (
            eval_and_make_adv.main,
            f"--model_path {ckpt} --dataset digits --model mlp_skinny",
            "its meta says so",
        ),
        (
            eval_and_make_adv.main,
            f"--model_path {legacy} --dataset digits --model mlp_skinny",
            "does not fit",
        ),
        (calculate_kernel.main, f"--model_path {ckpt} --model resnet18", "its meta says so"),
        (calculate_kernel.main, f"--model_path {ckpt} --dataset cifar10", "its meta says so"),
        # without meta, the defaults (resnet18 on cifar10) are checked before CIFAR is looked for
        (calculate_kernel.main, f"--model_path {legacy} --data_root {tmp_path}", "does not fit"),
        (run_exp.main, f"{DIGITS} --loaders XY", "--loaders"),
        (run_exp.main, f"{DIGITS} --loaders C", "--loaders"),
        (run_exp.main, f"{DIGITS} --loaders CCA", "--loaders"),
        (run_exp.main, f"{DIGITS} --eps -1", "--eps"),
        (run_exp.main, f"{DIGITS} --eps nan", "--eps"),
        (run_exp.main, f"{DIGITS} --eps inf", "--eps"),
        (run_exp.main, f"{DIGITS} --second_lr 0", "--second_lr"),
        (run_exp.main, f"{DIGITS} --second_lr -0.1", "--second_lr"),
        (run_exp.main, f"{DIGITS} --standard_epochs -3", "--standard_epochs"),
        (run_exp.main, f"{DIGITS} --linear_epochs 2.5", "--linear_epochs"),
        (run_exp.main, f"{DIGITS} --n_train 0", "--n_train"),
        # --n_train takes the first N: fewer than a batch is refused before anything is written
        (run_exp.main, f"{DIGITS} --n_train 100", "exceeds the 100 training images"),
        (calculate_kernel.main, f"--model_path {ckpt} {DIGITS} --dataset_size 105", "multiple"),
        (calculate_kernel.main, f"--model_path {ckpt} {DIGITS} --dataset_size 5000", "largest"),
        (calculate_kernel.main, f"--model_path {ckpt} {DIGITS} --class_index 10", "--class_index"),
        (calculate_kernel.main, f"--model_path {ckpt} {DIGITS} --class_index -2", "--class_index"),
        (run_exp.main, f"--data_root {tmp_path}/nodata --model cnn_small", "cifar-10-batches-py"),
        (run_exp.main, f"{DIGITS} --save_path {text_file}/sub", "--save_path"),
        (run_exp.main, f"{DIGITS} --base_model_path {ckpt} --model mlp_wide", "meta says"),
        (run_exp.main, f"{DIGITS} --base_model_path {legacy} --model mlp_wide", "does not fit"),
    ]
    for main, command, match in cases:
        assert match in one_line_error(main, command, capsys)
    assert digest(digits_run) == before  # nothing on disk was harmed


def test_wrong_test_path_examples_are_refused(digits_run, tmp_path, capsys):
    ckpt = f"{digits_run}/parameters_final.pkl"
    wrong = {
        "nhwc.pkl": {"images": np.zeros((4, 8, 8, 1)), "labels": np.zeros(4)},
        "range.pkl": {"images": np.full((4, 1, 8, 8), 2.0), "labels": np.zeros(4)},
        "labels.pkl": {"images": np.zeros((4, 1, 8, 8)), "labels": np.zeros(3)},
        "keys.pkl": {"x": np.zeros((4, 1, 8, 8))},
    }
    for name, record in wrong.items():
        save_pickle(record, str(tmp_path / name))
        message = one_line_error(
            eval_and_make_adv.main,
            f"--model_path {ckpt} {DIGITS} --no_adv --test_path {tmp_path / name}",
            capsys,
        )
        assert str(tmp_path / name) in message


def test_kernel_pickle_must_match_visualize_flags(digits_run, tmp_path, capsys):
    ckpt = f"{digits_run}/parameters_final.pkl"
    calculate_kernel.main(
        shlex.split(f"--model_path {ckpt} {DIGITS} --dataset_size 50 --class_index 1")
    )
    kernel = f"{digits_run}/saved_kernel_class_1_50.pkl"
    averaged = tmp_path / "averaged.pkl"
    record = load_pickle(kernel)
    save_pickle({**record, "class_index": -1}, str(averaged))
    for command, match in [
        (
            f"--model_path {ckpt} --kernel_path {kernel} --dataset digits --model mlp_skinny",
            "its meta says so",
        ),
        (f"--model_path {ckpt} --kernel_path {kernel} {DIGITS} --class_index 2", "class 1"),
        (f"--model_path {ckpt} --kernel_path {averaged} {DIGITS}", "class kernel"),
        (f"--model_path {ckpt} --kernel_path {ckpt} {DIGITS}", "not a kernel pickle"),
    ]:
        assert match in one_line_error(visualize_ntk_features.main, command, capsys)


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(
    digits_run, tmp_path, capsys
):
    """A learning rate near float32's maximum makes the phase-2 loss overflow at step 2."""
    ckpt = f"{digits_run}/parameters_final.pkl"
    save_path = tmp_path / "diverged"
    message = one_line_error(
        run_exp.main,
        f"{DIGITS} --base_model_path {ckpt} --linear_epochs 3 --second_lr 1e38 --skip_first_test "
        f"--constant_save_linear --save_path {save_path}",
        capsys,
    )
    assert "phase 2 epoch 1/3: the training loss became" in message
    state = load_pickle(str(save_path / "resume_state.pkl"))
    assert state["phase"] == 2 and state["epoch"] == 0
    assert all(np.all(np.isfinite(leaf)) for leaf in state["w"]["classifier"].values())
    # as in the original, linear_0 is written before epoch 1's last step, never reached here
    assert not (save_path / "parameters_checkpoint_linear_0.pkl").exists()
    assert not (save_path / "results.pkl").exists()


def test_command_line_errors_are_one_line_in_a_real_process(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval_and_make_adv.py"),
            "--model_path",
            "nope.pkl",
            *DIGITS.split(),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: nope.pkl: checkpoint not found (check the path)"
