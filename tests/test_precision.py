"""``precision: auto`` takes bfloat16 only on a CPU with bf16 hardware (fp32 on a GPU, where bf16 was measured no
faster); forcing bf16 without the hardware warns (it would be slower)."""

from __future__ import annotations

import warnings

import pytest

from bgad_core import precision
from bgad_core.errors import ConfigError
from bgad_core.precision import resolve_precision
from bgad_core.models.bgad.config import BGADConfig


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma", *flags}))
    return set_flags


def test_auto_is_fp32_on_a_cpu_without_bf16_and_bf16_on_one_with_it(cpu_with):
    cpu_with("avx512f")
    assert resolve_precision("auto", "cpu") == "fp32"
    cpu_with("avx512f", "avx512_bf16")
    assert resolve_precision("auto", "cpu") == "bf16"
    cpu_with("amx_bf16")
    assert resolve_precision("auto", "cpu") == "bf16"


def test_auto_is_fp32_on_a_gpu_where_bf16_was_measured_slower_and_a_forced_bf16_is_kept(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", "cuda") == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the GPU has bf16: no warning
        assert resolve_precision("bf16", "cuda") == "bf16"


def test_forced_bf16_without_hardware_warns_and_is_kept(cpu_with):
    cpu_with()
    with pytest.warns(RuntimeWarning, match="slower than fp32"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_auto_is_the_default_and_unknown_values_are_named():
    assert BGADConfig().precision == "auto"
    with pytest.raises(ConfigError, match="precision must be one of \\['auto', 'fp32', 'bf16'\\], got 'fp16'"):
        BGADConfig(precision="fp16")

