"""The safe loader (utils.load_pickle) accepts every honest array NumPy pickles: every memory
layout, under pickle protocols 2 to 5, written by NumPy 2 here and by NumPy 1 (the files in
tests/numpy1_pickles, written by tests/array_layouts.py under NumPy 1.26.4). The reference is
NumPy's own unpickler (plain pickle.loads of the same bytes). What the loader refuses is tested in
test_reliability.py and test_bad_inputs.py; the refusals that the new forms could open are
tested here."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from array_layouts import PROTOCOLS, layouts
from conftest import ROOT

from ntk_evolution.utils import UserError, load_pickle, save_pickle

NUMPY1 = os.path.join(ROOT, "tests", "numpy1_pickles")
LAYOUTS = layouts()


def assert_same_array(got, expected):
    """Same type (array or NumPy scalar), shape, dtype and values."""
    assert type(got) is type(expected)
    assert np.shape(got) == np.shape(expected)
    assert np.asarray(got).dtype == np.asarray(expected).dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_and_protocol_loads_as_numpy_loads_it(tmp_path, layout, protocol):
    value = LAYOUTS[layout]
    data = pickle.dumps({"value": value}, protocol=protocol)
    path = tmp_path / "array.pkl"
    path.write_bytes(data)
    got = load_pickle(str(path))["value"]
    assert_same_array(got, pickle.loads(data)["value"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value))


def test_the_numpy1_files_were_written_by_numpy1():
    with open(os.path.join(NUMPY1, "VERSION")) as f:
        assert f.read().startswith("1.")
    with open(os.path.join(NUMPY1, "c_order_p5.pkl"), "rb") as f:
        data = f.read()
    assert b"numpy.core.numeric" in data and b"numpy._core" not in data


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_numpy1_files_of_every_layout_and_protocol_load(layout, protocol):
    path = os.path.join(NUMPY1, f"{layout}_p{protocol}.pkl")
    got = load_pickle(path)["value"]
    with open(path, "rb") as f:
        assert_same_array(got, pickle.load(f)["value"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(LAYOUTS[layout]))


def test_transposed_images_are_written_c_ordered_and_read_back(tmp_path):
    """save_pickle stores an array that is neither C- nor Fortran-ordered as a C-ordered copy
    (NumPy before 2.3 cannot read protocol 5's form of it), and the loader returns it."""
    images = LAYOUTS["nchw_from_nhwc"]
    assert not (images.flags.c_contiguous or images.flags.f_contiguous)
    path = str(tmp_path / "adv_examples_x.pkl")
    save_pickle({"images": images, "labels": np.arange(2)}, path)
    with open(path, "rb") as f:
        assert b"_frombuffer" in f.read()  # protocol 5's form, for a C-ordered array
    loaded = load_pickle(path)["images"]
    assert loaded.flags.c_contiguous
    assert_same_array(loaded, images)


def frombuffer_pickle(shape: tuple, axis_order) -> bytes:
    """A protocol-2 pickle calling numpy's _frombuffer(bytes, float32, shape, 'K', axis_order)
    on 4 * prod(shape) bytes."""
    data = np.arange(int(np.prod(shape)), dtype=np.float32).tobytes()

    def text(s):
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    dtype = b"cnumpy\ndtype\n" + text("f4") + b"\x89\x88\x87R"
    return (
        b"\x80\x03cnumpy._core.numeric\n_frombuffer\n("
        + b"B"
        + struct.pack("<I", len(data))
        + data
        + dtype
        + pickle.dumps(shape, protocol=2)[2:-1]
        + text("K")
        + pickle.dumps(axis_order, protocol=2)[2:-1]
        + b"tR."
    )


def test_the_axis_order_form_is_the_one_numpy_writes(tmp_path):
    path = tmp_path / "ok.pkl"
    path.write_bytes(frombuffer_pickle((2, 3, 4), (0, 2, 1)))
    expected = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1)
    assert_same_array(load_pickle(str(path)), expected)


@pytest.mark.parametrize("axis_order", [(0, 1), (0, 1, 1), (0, 1, 5), "abc", (0.0, 1.0, 2.0)])
def test_an_axis_order_that_is_not_a_permutation_is_refused(tmp_path, axis_order):
    path = tmp_path / "bad.pkl"
    path.write_bytes(frombuffer_pickle((2, 3, 4), axis_order))
    with pytest.raises(UserError, match="not a valid"):
        load_pickle(str(path))


def test_bytes_of_a_size_named_in_the_file_are_refused(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.")  # bytes(2**30)
    with pytest.raises(UserError, match="allocate bytes of a size"):
        load_pickle(str(path))
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\n)R.")  # bytes(): protocol 2's empty bytes
    assert load_pickle(str(path)) == b""
