"""The runtime's CPU matmul kernels: prepacked products equal F.linear, and the one-row and few-rows kernels are
chosen by measurement unless $CLOVER_ONE_ROW_KERNEL / $CLOVER_FEW_ROWS_KERNEL say which."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clover.errors import CloverError
from clover.model import kernels
from clover.model.kernels import (PrepackedLinear, few_rows_kernel, measure_few_rows, measure_one_row,
                                  one_row_kernel)


@pytest.fixture
def fresh_choice(monkeypatch):
    """An unresolved choice (restored after the test)."""
    monkeypatch.setattr(kernels, "_one_row", None)
    monkeypatch.setattr(kernels, "one_row_measured", None)
    monkeypatch.setattr(kernels, "_few_rows", None)
    monkeypatch.setattr(kernels, "few_rows_measured", None)
    return monkeypatch


@pytest.mark.parametrize("value", ["gemv", "packed", " Packed "])
def test_environment_decides(fresh_choice, value):
    fresh_choice.setenv("CLOVER_ONE_ROW_KERNEL", value)
    assert one_row_kernel() == value.strip().lower()
    assert kernels.one_row_measured is None  # nothing measured
    fresh_choice.setenv("CLOVER_ONE_ROW_KERNEL", "gemv" if value.strip().lower() == "packed" else "packed")
    assert one_row_kernel() == value.strip().lower()  # resolved once per process


def test_bad_environment_value_is_one_clear_error(fresh_choice):
    fresh_choice.setenv("CLOVER_ONE_ROW_KERNEL", "fastest")
    with pytest.raises(CloverError, match=r"CLOVER_ONE_ROW_KERNEL='fastest': use gemv, packed or auto"):
        one_row_kernel()


def test_auto_keeps_the_measured_faster_kernel(fresh_choice):
    fresh_choice.delenv("CLOVER_ONE_ROW_KERNEL", raising=False)
    for ratio, choice in ((0.6, "packed"), (0.97, "gemv"), (1.4, "gemv")):
        fresh_choice.setattr(kernels, "_one_row", None)
        fresh_choice.setattr(kernels, "measure_one_row", lambda ratio=ratio: {"packed_over_gemv": ratio})
        assert one_row_kernel() == choice
        assert kernels.one_row_measured == {"packed_over_gemv": ratio}  # the measurement that decided, kept


def test_measurement_times_both_kernels():
    m = measure_one_row(megabytes=8, rounds=2)
    assert m["gemv_ms"] > 0 and m["packed_ms"] > 0
    assert m["packed_over_gemv"] > 0
    m = measure_few_rows(rows=4, megabytes=8, rounds=2)
    assert m["blas_ms"] > 0 and m["packed_ms"] > 0 and m["packed_over_blas"] > 0 and m["rows"] == 4


def test_few_rows_kernel_by_environment_and_by_measurement(fresh_choice):
    fresh_choice.setenv("CLOVER_FEW_ROWS_KERNEL", " BLAS")
    assert few_rows_kernel(2) == few_rows_kernel(30) == "blas" and kernels.few_rows_measured is None
    fresh_choice.setattr(kernels, "_few_rows", None)
    fresh_choice.setenv("CLOVER_FEW_ROWS_KERNEL", "fastest")
    with pytest.raises(CloverError, match=r"CLOVER_FEW_ROWS_KERNEL='fastest': use blas, packed or auto"):
        few_rows_kernel()
    fresh_choice.delenv("CLOVER_FEW_ROWS_KERNEL")
    for ratios, choices in (((1.3, 0.7), ("blas", "packed")), ((1.02, 1.2), ("packed", "blas"))):
        fresh_choice.setattr(kernels, "_few_rows", None)
        fresh_choice.setattr(kernels, "measure_few_rows",
                             lambda rows, ratios=ratios: {"packed_over_blas": ratios[rows > 2]})
        assert [few_rows_kernel(n) for n in (2, 3, 4, 32)] == [choices[0]] * 2 + [choices[1]] * 2
        assert kernels.few_rows_measured == {2: {"packed_over_blas": ratios[0]}, 8: {"packed_over_blas": ratios[1]}}


@pytest.mark.parametrize("few", [{2: "blas", 8: "blas"}, {2: "packed", 8: "packed"}, {2: "blas", 8: "packed"}])
@pytest.mark.parametrize("choice", ["gemv", "packed"])
@pytest.mark.parametrize("shape", [(1, 1, 48), (48,), (1, 5, 48), (3, 2, 48), (40, 48)])
def test_prepacked_equals_linear(monkeypatch, choice, few, shape):
    monkeypatch.setattr(kernels, "_one_row", choice)
    monkeypatch.setattr(kernels, "_few_rows", few)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 48, generator=gen), torch.randn(40, generator=gen)
    x = torch.randn(shape, generator=gen)
    kernel = PrepackedLinear()
    with torch.inference_mode():
        for b in (None, bias):
            torch.testing.assert_close(kernel(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    one_row = x.numel() == x.shape[-1]
    assert (kernel._packed is not None) == (choice == "packed" or not one_row)  # which kernel ran


def test_prepacked_repacks_a_changed_weight(monkeypatch):
    monkeypatch.setattr(kernels, "_one_row", "packed")
    weight = torch.randn(8, 16)
    x = torch.randn(1, 16)
    kernel = PrepackedLinear()
    with torch.no_grad():
        kernel(x, weight)
        weight.mul_(2)  # in place: a new version of the same storage
        torch.testing.assert_close(kernel(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,bf16", [(0.5, True), (0.9, False), (1.7, False)])
def test_training_autocast_is_bf16_only_where_clearly_faster(monkeypatch, ratio, bf16):
    monkeypatch.setattr(kernels, "_bf16_training", None)
    monkeypatch.setattr(kernels, "training_measured", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(kernels, "measure_training_dtypes", lambda: {"bf16_over_fp32": ratio})
    assert kernels.bf16_training_pays() is bf16
    assert kernels.training_measured == {"bf16_over_fp32": ratio}


def test_training_dtypes_are_measured_on_a_real_layer():
    found = kernels.measure_training_dtypes(rows=64, hidden=32, rounds=1)
    assert found["fp32_ms"] > 0 and found["bf16_ms"] > 0 and found["bf16_over_fp32"] > 0
