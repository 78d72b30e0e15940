"""Bad input to every script, as a careless or hostile user gives it: each case must end in one
line `error: ...` with exit code 2, no traceback, and every file already on disk unchanged.

The bad files are made from a real run's checkpoint, resume state and kernel, or written as raw
pickle opcodes where a Python object would not pickle that way (allocation, deep nesting).
"""

# ruff: noqa: E501 (the table reads best one case a line)
from __future__ import annotations

import hashlib
import os
import pickle
import shlex
import shutil
import signal
import struct
import sys

import numpy as np
import pytest
from helpers import SCRIPTS, one_line_error

import calculate_kernel
import eval_and_make_adv
import run_exp
from ntk_evolution.utils import load_pickle, run_main, save_pickle

DIGITS = "--dataset digits --model cnn_small"
RUN_FLAGS = f"{DIGITS} --standard_epochs 1 --linear_epochs 0 --random_seed 4"


# ----------------------------------------------------------------------------- raw pickles


def raw(body: bytes) -> bytes:
    """A protocol-2 pickle of the opcodes `body`."""
    return b"\x80\x02" + body + b"."


def text(s: str) -> bytes:
    """BINUNICODE opcode pushing `s`."""
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def checkpoint_around(params_opcodes: bytes) -> bytes:
    """{'params': <params_opcodes>, 'net_state': {}} as opcodes."""
    return raw(b"}" + text("params") + params_opcodes + b"s" + text("net_state") + b"}s")


HUGE = b"\x8a\x06\x00\x00\x00\x00\x00\x01"  # LONG1: 2**40
FITS = b"J\x00\x00\x00\x08"  # BININT: 2**27 bytes, which would fit, zero-filled
RAW_FILES = {
    "alloc_bytearray_huge.pkl": checkpoint_around(
        global_("builtins", "bytearray") + HUGE + b"\x85R"
    ),
    "alloc_bytearray_fits.pkl": checkpoint_around(
        global_("builtins", "bytearray") + FITS + b"\x85R"
    ),
    "alloc_ndarray.pkl": checkpoint_around(
        global_("numpy.core.multiarray", "_reconstruct")
        + global_("numpy", "ndarray")
        + HUGE
        + b"\x85C\x01b\x87R"
    ),
    "alloc_ndarray_new.pkl": checkpoint_around(global_("numpy", "ndarray") + FITS + b"\x85\x81"),
    "alloc_list_of_bytes.pkl": checkpoint_around(
        global_("builtins", "list") + b"C\x04abcd\x85R"
    ),  # an iterator's worth of ints
    "alloc_memo.pkl": raw(b"}r\xff\xff\xff\x7f"),  # LONG_BINPUT at index 2**31 - 1
    "alloc_binbytes8.pkl": b"\x80\x04\x8e" + struct.pack("<Q", 2**50) + b"abc.",
    "deep.pkl": checkpoint_around(b"}" + (text("a") + b"}") * 200_000 + b"s" * 200_000),
    "empty.pkl": b"",
    "garbage.pkl": bytes(range(256)) * 4,
}


def params_with(ckpt: dict, transform) -> dict:
    """The checkpoint with every params leaf replaced by transform(leaf)."""

    def tree(t):
        return {k: tree(v) if isinstance(v, dict) else transform(v) for k, v in t.items()}

    return {**ckpt, "params": tree(ckpt["params"]), "lin_params": tree(ckpt["lin_params"])}


def first_leaf_replaced(tree: dict, value) -> dict:
    module = next(iter(tree))
    name = next(iter(tree[module]))
    return {**tree, module: {**tree[module], name: value}}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real run (checkpoint, resume state, kernel) and the bad files made from it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    run_exp.main(
        shlex.split(f"{RUN_FLAGS} --save_models --skip_first_test --n_test 30 --save_path {run}")
    )
    ckpt_path = str(run / "parameters_final.pkl")
    calculate_kernel.main(
        shlex.split(f"--model_path {ckpt_path} {DIGITS} --dataset_size 20 --class_index 1")
    )
    ckpt = load_pickle(ckpt_path)
    kernel = load_pickle(str(run / "saved_kernel_class_1_20.pkl"))
    resume = load_pickle(str(run / "resume_state.pkl"))
    bad = root / "bad"
    bad.mkdir()
    for name, data in RAW_FILES.items():
        (bad / name).write_bytes(data)
    leaf = first_leaf_replaced
    pickles = {
        # checkpoints
        "ck_list.pkl": [ckpt["params"]],
        "ck_no_state.pkl": {"params": ckpt["params"]},
        "ck_object_leaves.pkl": params_with(ckpt, lambda v: v.astype(object)),
        "ck_string_leaves.pkl": params_with(ckpt, lambda v: np.full(v.shape, "w")),
        "ck_int_leaves.pkl": params_with(ckpt, lambda v: v.astype(np.int32)),
        "ck_complex_leaves.pkl": params_with(ckpt, lambda v: v.astype(np.complex64)),
        "ck_bool_leaf.pkl": {**ckpt, "params": leaf(ckpt["params"], True)},
        "ck_text_leaf.pkl": {**ckpt, "params": leaf(ckpt["params"], "weights")},
        "ck_nan.pkl": params_with(ckpt, lambda v: np.full_like(v, np.nan)),
        "ck_one_inf.pkl": {**ckpt, "params": leaf(ckpt["params"], np.array([np.inf]))},
        "ck_int_key.pkl": {**ckpt, "params": {**ckpt["params"], 7: np.zeros(3)}},
        "ck_meta_str.pkl": {**ckpt, "meta": "cnn_small"},
        "ck_meta_model.pkl": {**ckpt, "meta": {**ckpt["meta"], "model": "vgg"}},
        "ck_meta_epoch.pkl": {**ckpt, "meta": {**ckpt["meta"], "epoch": "last"}},
        "ck_huge_params.pkl": params_with(ckpt, lambda v: v * np.float32(1e30)),
        # kernels
        "k_nonsquare.pkl": {**kernel, "kernel": kernel["kernel"][:, :-1]},
        "k_labels_len.pkl": {**kernel, "labels": kernel["labels"][:-1]},
        "k_nan.pkl": {**kernel, "kernel": np.where(np.eye(20) > 0, np.nan, kernel["kernel"])},
        "k_epoch_str.pkl": {**kernel, "epoch": "five"},
        "k_class_range.pkl": {**kernel, "class_index": 12},
        "k_labels_str.pkl": {**kernel, "labels": kernel["labels"].astype(str)},
        "k_labels_frac.pkl": {**kernel, "labels": kernel["labels"] + 0.5},
        "k_full.pkl": {
            **kernel,
            "kernel": np.kron(np.eye(10), kernel["kernel"]),
            "full": True,
            "n_logits": 10,
            "class_index": -1,
        },
        "k_full_logits.pkl": {
            **kernel,
            "kernel": np.kron(np.eye(10), kernel["kernel"]),
            "full": True,
            "n_logits": 3,
            "class_index": -1,
        },
        "k_labels_range.pkl": {**kernel, "labels": kernel["labels"] + 10},
        "k_asymmetric.pkl": {**kernel, "kernel": np.triu(kernel["kernel"])},
        "k_kernel_dict.pkl": {**kernel, "kernel": {"values": kernel["kernel"]}},
        "k_empty.pkl": {**kernel, "kernel": np.zeros((0, 0)), "labels": np.zeros(0, int)},
        "k_indices_neg.pkl": {**kernel, "indices": -kernel["indices"] - 1},
        "k_dataset.pkl": {**kernel, "dataset": "mnist"},
        "k_epoch_inf.pkl": {**kernel, "epoch": float("inf")},
        # examples
        "ex_zero.pkl": {"images": np.zeros((0, 1, 8, 8)), "labels": np.zeros(0, int)},
        "ex_images_dict.pkl": {"images": {"a": np.zeros((4, 1, 8, 8))}, "labels": np.zeros(4)},
        "ex_images_str.pkl": {"images": np.full((4, 1, 8, 8), "0.5"), "labels": np.zeros(4)},
        "ex_images_obj.pkl": {
            "images": np.zeros((4, 1, 8, 8)).astype(object),
            "labels": np.zeros(4, int),
        },
        "ex_labels_str.pkl": {"images": np.zeros((4, 1, 8, 8)), "labels": np.array(list("0123"))},
        "ex_labels_frac.pkl": {"images": np.zeros((4, 1, 8, 8)), "labels": np.full(4, 1.5)},
        "ex_labels_range.pkl": {"images": np.zeros((4, 1, 8, 8)), "labels": np.full(4, 10)},
        "ex_labels_neg.pkl": {"images": np.zeros((4, 1, 8, 8)), "labels": np.full(4, -1)},
        "ex_nan.pkl": {"images": np.full((4, 1, 8, 8), np.nan), "labels": np.zeros(4, int)},
        "ex_list.pkl": [np.zeros((4, 1, 8, 8)), np.zeros(4)],
        # resume states (the run's flags, so that only the file is wrong)
        "rs_list/resume_state.pkl": [resume],
        "rs_no_w/resume_state.pkl": {k: v for k, v in resume.items() if k != "w"},
        "rs_phase/resume_state.pkl": {**resume, "phase": 3},
        "rs_phase_str/resume_state.pkl": {**resume, "phase": "2"},
        "rs_epoch/resume_state.pkl": {**resume, "epoch": -1},
        "rs_config/resume_state.pkl": {**resume, "config": ["eps"]},
        "rs_w_shape/resume_state.pkl": {**resume, "w": leaf(resume["w"], np.zeros(3, np.float32))},
        "rs_w_nan/resume_state.pkl": {
            **resume,
            "w": leaf(resume["w"], np.full((3, 3, 1, 8), np.nan, np.float32)),
        },
        "rs_w_str/resume_state.pkl": {**resume, "w": "parameters"},
        "rs_theta_missing/resume_state.pkl": {**resume, "theta_t": None},
        "rs_opt/resume_state.pkl": {**resume, "opt_state_leaves": resume["opt_state_leaves"][:1]},
        "rs_opt_str/resume_state.pkl": {**resume, "opt_state_leaves": "momentum"},
        "rs_results/resume_state.pkl": {**resume, "results": {"standard": float("nan")}},
    }
    for name, obj in pickles.items():
        (bad / name).parent.mkdir(exist_ok=True)
        with open(bad / name, "wb") as f:  # plain pickle: save_pickle refuses NaN (rightly)
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    (bad / "a_file").write_text("not a folder")
    return {"root": root, "ckpt": ckpt_path, "kernel": str(run / "saved_kernel_class_1_20.pkl")}


def tree_digest(root) -> dict:
    """sha256 of every file under `root`, by relative path."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- the table

CK, K, B = "{ckpt}", "{kernel}", "{bad}"
CASES = [
    # ---- run_exp.py
    ("run_exp", f"{RUN_FLAGS} --base_model_path {B}/ck_nan.pkl --save_path {B}/out", "NaN"),
    ("run_exp", f"{RUN_FLAGS} --base_model_path {B}/deep.pkl --save_path {B}/out", "nested"),
    ("run_exp", f"{RUN_FLAGS} --base_model_path {B}/ck_string_leaves.pkl --save_path {B}/o", "dtype"),
    ("run_exp", f"{RUN_FLAGS} --base_model_path {B}/alloc_ndarray.pkl --save_path {B}/o", "allocate"),
    ("run_exp", f"{RUN_FLAGS} --train_path {B}/ex_labels_frac.pkl --save_path {B}/o", "fractional"),
    ("run_exp", f"{RUN_FLAGS} --train_path {B}/ex_zero.pkl --save_path {B}/o", "no images"),
    ("run_exp", f"{RUN_FLAGS} --train_path {B}/ex_images_dict.pkl --save_path {B}/o", "images"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_list", "not a resume state"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_no_w", "no w"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_phase", "phase"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_phase_str", "phase"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_epoch", "epoch"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_config", "config"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_w_shape", "shape"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_w_nan", "NaN"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_w_str", "w is a str"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_theta_missing", "theta_t"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_opt", "optimizer state"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_opt_str", "opt_state_leaves"),
    ("run_exp", f"{RUN_FLAGS} --resume --save_path {B}/rs_results", "finite"),
    ("run_exp", f"{RUN_FLAGS} --save_path {B}/a_file", "--save_path"),
    # ---- eval_and_make_adv.py
    ("eval_and_make_adv", f"--model_path {B}/ck_nan.pkl {DIGITS}", "NaN"),
    ("eval_and_make_adv", f"--model_path {B}/ck_one_inf.pkl {DIGITS}", "NaN or infinite"),
    ("eval_and_make_adv", f"--model_path {B}/alloc_bytearray_huge.pkl {DIGITS}", "allocate"),
    ("eval_and_make_adv", f"--model_path {B}/alloc_bytearray_fits.pkl {DIGITS}", "allocate"),
    ("eval_and_make_adv", f"--model_path {B}/alloc_ndarray_new.pkl {DIGITS}", "not a valid"),
    ("eval_and_make_adv", f"--model_path {B}/alloc_list_of_bytes.pkl {DIGITS}", "allocate"),
    ("eval_and_make_adv", f"--model_path {B}/alloc_memo.pkl {DIGITS}", "not a checkpoint"),
    ("eval_and_make_adv", f"--model_path {B}/alloc_binbytes8.pkl {DIGITS}", "not a valid"),
    ("eval_and_make_adv", f"--model_path {B}/empty.pkl {DIGITS}", "not a valid"),
    ("eval_and_make_adv", f"--model_path {B}/garbage.pkl {DIGITS}", "not a valid"),
    ("eval_and_make_adv", f"--model_path {B}/ck_object_leaves.pkl {DIGITS}", "dtype object"),
    ("eval_and_make_adv", f"--model_path {B}/ck_meta_str.pkl {DIGITS}", "meta"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --test_path {B}/ex_zero.pkl", "no images"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --test_path {B}/ex_images_str.pkl", "dtype"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --test_path {B}/ex_labels_str.pkl", "labels"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --test_path {B}/ex_labels_range.pkl", "above 9"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --test_path {B}/ex_nan.pkl", "NaN"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --transfer_path {B}/ex_list.pkl", "adv_examples"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --bonus_dir {B}/a_file", "--bonus_dir"),
    ("eval_and_make_adv", f"--model_path {CK} {DIGITS} --eps_l2 nan --autoattack", "--eps_l2"),
    # ---- calculate_kernel.py
    ("calculate_kernel", f"--model_path {B}/ck_nan.pkl {DIGITS}", "NaN"),
    ("calculate_kernel", f"--model_path {B}/ck_int_leaves.pkl {DIGITS}", "dtype int32"),
    ("calculate_kernel", f"--model_path {B}/ck_complex_leaves.pkl {DIGITS}", "dtype complex64"),
    ("calculate_kernel", f"--model_path {B}/ck_int_key.pkl {DIGITS}", "key 7"),
    ("calculate_kernel", f"--model_path {CK} '{B}/ck_n*.pkl' {DIGITS}", "NaN"),
    ("calculate_kernel", f"--model_path {CK} {DIGITS} --bonus_dir {B}/a_file", "--bonus_dir"),
    # a finite checkpoint whose kernel overflows: the kernel is not written
    ("calculate_kernel", f"--model_path {B}/ck_huge_params.pkl {DIGITS} --dataset_size 10", "not writing"),
    # ---- visualize_ntk_features.py
    ("visualize_ntk_features", f"--model_path {B}/ck_bool_leaf.pkl {DIGITS}", "bool"),
    ("visualize_ntk_features", f"--model_path {CK} --kernel_path {B}/k_nan.pkl {DIGITS}", "NaN"),
    ("visualize_ntk_features", f"--model_path {CK} --kernel_path {B}/k_nonsquare.pkl {DIGITS}", "(N, N)"),
    ("visualize_ntk_features", f"--model_path {CK} --kernel_path {B}/k_kernel_dict.pkl {DIGITS}", "kernel is a dict"),
    ("visualize_ntk_features", f"--model_path {CK} --kernel_path {B}/deep.pkl {DIGITS}", "nested"),
    # ---- analyze_kernels.py
    ("analyze_kernels", f"{B}/k_nonsquare.pkl --out_dir {B}/ka", "(N, N)"),
    ("analyze_kernels", f"{B}/k_labels_len.pkl --out_dir {B}/ka", "19 labels"),
    ("analyze_kernels", f"{B}/k_nan.pkl --out_dir {B}/ka", "NaN"),
    ("analyze_kernels", f"{B}/k_epoch_str.pkl --out_dir {B}/ka", "epoch"),
    ("analyze_kernels", f"{B}/k_epoch_inf.pkl --out_dir {B}/ka", "epoch"),
    ("analyze_kernels", f"{B}/k_class_range.pkl --out_dir {B}/ka", "class_index"),
    ("analyze_kernels", f"{B}/k_labels_str.pkl --out_dir {B}/ka", "labels"),
    ("analyze_kernels", f"{B}/k_labels_frac.pkl --out_dir {B}/ka", "fractional"),
    ("analyze_kernels", f"{B}/k_full_logits.pkl --out_dir {B}/ka", "200 rows for 3 logits"),
    ("calculate_kernel", f"--model_path {CK} {DIGITS} --full --class_index 2", "drop --class_index"),
    ("analyze_kernels", f"{B}/k_labels_range.pkl --out_dir {B}/ka", "above 9"),
    ("analyze_kernels", f"{B}/k_empty.pkl --out_dir {B}/ka", "N >= 1"),
    ("analyze_kernels", f"{B}/k_asymmetric.pkl --out_dir {B}/ka", "not symmetric"),
    ("analyze_kernels", f"{B}/ex_nan.pkl --out_dir {B}/ka", "not a kernel pickle"),
    ("analyze_kernels", f"{B}/k_indices_neg.pkl --out_dir {B}/ka", "indices"),
    ("analyze_kernels", f"{B}/k_dataset.pkl --out_dir {B}/ka", "mnist"),
    ("analyze_kernels", f"{B}/ck_nan.pkl --out_dir {B}/ka", "not a kernel pickle"),
    ("analyze_kernels", f"{K} --out_dir {B}/a_file", "--out_dir"),
    ("analyze_kernels", f"{K} --out_dir {B}/a_file/sub", "--out_dir"),
    # ---- ntk_attack.py
    ("ntk_attack", f"--model_path {B}/ck_nan.pkl {DIGITS} --out_dir {B}/na", "NaN"),
    ("ntk_attack", f"--model_path {CK} {DIGITS} --kernel_path {B}/k_nan.pkl --out_dir {B}/na", "NaN"),
    ("ntk_attack", f"--model_path {CK} {DIGITS} --support_path {B}/ex_labels_neg.pkl --out_dir {B}/na", "below 0"),
    ("ntk_attack", f"--model_path {CK} {DIGITS} --transfer_path {B}/ex_nan.pkl --out_dir {B}/na", "NaN"),
    ("ntk_attack", f"--model_path {CK} {DIGITS} --out_dir {B}/a_file", "--out_dir"),
    ("ntk_attack", f"--model_path {CK} {DIGITS} --kernel_path {B}/k_full.pkl --out_dir {B}/na", "a full kernel"),
    ("ntk_attack", f"--model_path {CK} {DIGITS} --attack_variant fgsm --restarts 3 --out_dir {B}/na", "needs --attack_variant pgd"),
    # ---- eigen_features.py
    ("eigen_features", f"--model_path {B}/ck_text_leaf.pkl {DIGITS} --out_dir {B}/ef", "str"),
    ("eigen_features", f"--model_path {CK} {DIGITS} --support_path {B}/ex_images_obj.pkl --out_dir {B}/ef", "dtype object"),
    ("eigen_features", f"--model_path {CK} {DIGITS} --kernel_path {B}/k_labels_frac.pkl --out_dir {B}/ef", "fractional"),
    ("eigen_features", f"--model_path {CK} {DIGITS} --out_dir {B}/a_file", "--out_dir"),
    # ---- cka.py
    ("cka", f"--model_path {B}/ck_nan.pkl --savedir {B}/cka", "NaN"),
    ("cka", f"--model_path {CK} {B}/ck_meta_model.pkl --savedir {B}/cka", "vgg"),
    ("cka", f"--model_path {CK} {B}/alloc_ndarray.pkl --savedir {B}/cka", "allocate"),
    ("cka", f"--model_path {CK} --savedir {B}/a_file", "--savedir"),
    ("cka", f"--robustbench Standard --model_dir {B}/rb --savedir {B}/cka", "rb/cifar10/Linf/Standard.pt"),
    ("cka", f"--robustbench Standrd --model_dir {B}/rb --savedir {B}/cka", "did you mean Standard"),
    ("cka", f"--model_path {CK} --robustbench Standard --savedir {B}/cka", "compare with each other only"),
    ("cka", f"--model_path {B}/nothing.pth.tar --model wrn_28_1 --savedir {B}/cka", "not found"),
    ("cka", f"--model_path {B}/nothing.pth.tar --model wrn_28_1 --reuse_adv --savedir {B}/cka", "--adv 1 1"),
    # ---- robustify_dataset.py
    ("robustify_dataset", f"--model_path {B}/ck_meta_epoch.pkl {DIGITS} --out_dir {B}/rd", "epoch"),
    ("robustify_dataset", f"--model_path {B}/ck_no_state.pkl {DIGITS} --out_dir {B}/rd", "net_state"),
    ("robustify_dataset", f"--model_path {B}/ck_list.pkl {DIGITS} --out_dir {B}/rd", "not a checkpoint"),
    ("robustify_dataset", f"--model_path {B}/ck_complex_leaves.pkl {DIGITS} --out_dir {B}/rd", "complex"),
    ("robustify_dataset", f"--model_path {CK} {DIGITS} --out_dir {B}/a_file", "--out_dir"),
    ("robustify_dataset", f"{DIGITS} --max_change nan --out_dir {B}/rd", "--max_change"),
    ("robustify_dataset", f"{DIGITS} --max_change 0 --out_dir {B}/rd", "--max_change"),
]  # fmt: skip


def test_the_table_covers_every_script_with_enough_cases():
    assert len(CASES) >= 60
    assert {script for script, _, _ in CASES} == set(SCRIPTS)


@pytest.mark.parametrize(
    "script, command, match", CASES, ids=[f"{s}:{i}" for i, (s, _, _) in enumerate(CASES)]
)
def test_bad_input_is_one_line_with_exit_code_2_and_harms_nothing(
    files, capsys, script, command, match
):
    root = files["root"]
    command = command.format(ckpt=files["ckpt"], kernel=files["kernel"], bad=root / "bad")
    before = tree_digest(root)
    err = one_line_error(SCRIPTS[script], command, capsys)
    assert match in err, err
    assert tree_digest(root) == before  # nothing written, nothing changed
    for folder in ("out", "o", "ka", "na", "ef", "cka", "rd"):
        shutil.rmtree(root / "bad" / folder, ignore_errors=True)  # none should exist anyway


def test_a_schema_error_names_the_file_the_problem_and_what_to_do(files, capsys):
    path = files["root"] / "bad" / "ck_nan.pkl"
    with pytest.raises(SystemExit):
        run_main(eval_and_make_adv.main, shlex.split(f"--model_path {path} {DIGITS}"))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: params[") and "NaN" in err
    assert err.endswith(")") and "(" in err.split("values", 1)[1]


def test_outputs_with_nan_are_refused_before_writing(tmp_path):
    from ntk_evolution.utils import UserError, write_json

    with pytest.raises(UserError, match=r"not writing .*\['kernel'\] has 1 NaN"):
        save_pickle({"kernel": np.array([[1.0, np.nan]])}, str(tmp_path / "k.pkl"))
    with pytest.raises(UserError, match="not writing"):
        write_json({"acc": [0.5, float("inf")]}, str(tmp_path / "a.json"))
    assert os.listdir(tmp_path) == []


def ctrl_c():
    raise KeyboardInterrupt


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # a real signal: run_main's handler takes it


@pytest.mark.parametrize(
    "stop, code, cause",
    [(ctrl_c, 130, "interrupted"), (sigterm, 143, "terminated (SIGTERM)")],
    ids=["ctrl_c", "sigterm"],
)
@pytest.mark.parametrize(
    "script, command",
    [("analyze_kernels", "{kernel} --out_dir {out}"), ("calculate_kernel", "--model_path {ckpt}")],
)
def test_ctrl_c_or_sigterm_in_other_scripts_is_one_line_and_its_exit_code(
    files, capsys, monkeypatch, tmp_path, script, command, stop, code, cause
):
    module = sys.modules[SCRIPTS[script].__module__]
    monkeypatch.setattr(module, "expand_paths", lambda *a, **k: stop())  # while inputs are read
    command = command.format(kernel=files["kernel"], ckpt=files["ckpt"], out=tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_main(SCRIPTS[script], shlex.split(command))
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{cause}; nothing half-written") and len(err.splitlines()) == 1
