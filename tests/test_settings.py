"""fastdiff.settings: every environment variable parsed in one place, bad values named, override() and its undo."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import settings
from fastdiff.ops import routing
from fastdiff.ops.registry import PRIORITY


def test_defaults_and_each_variable():
    assert settings.from_environ({}) == settings.Settings()
    s = settings.from_environ({
        "FASTDIFF_BACKEND": "ref", "FASTDIFF_CPU_ISA": "scalar", "FASTDIFF_CPU_ROUTE": "avx512",
        "FASTDIFF_CPU_BF16_MATH": "bf16", "FASTDIFF_CACHE": "/tmp/c", "FASTDIFF_FASHION_MNIST": "/data/fm",
        "TRITON_INTERPRET": "1"})
    assert s == settings.Settings(backend="ref", cpu_isa="scalar", cpu_route="avx512", cpu_bf16_math="native",
                                  cache_dir=Path("/tmp/c"), fashion_mnist=Path("/data/fm"), triton_interpret=True)
    assert settings.from_environ({"FASTDIFF_BACKEND": "auto", "FASTDIFF_CPU_ISA": "auto"}).backend is None
    assert settings.from_environ({"FASTDIFF_CACHE": "off"}).cache_dir is None
    assert settings.from_environ({"FASTDIFF_CACHE_DIR": "/x"}).cache_dir == Path("/x")  # the older name
    assert settings.from_environ({"FASTDIFF_CACHE": "/a", "FASTDIFF_CACHE_DIR": "/b"}).cache_dir == Path("/a")
    assert settings.from_environ({"FASTDIFF_CPU_BF16_MATH": "float32"}).cpu_bf16_math == "fp32"


@pytest.mark.parametrize("var,value,field", [
    ("FASTDIFF_BACKEND", "bogus", "backend"),
    ("FASTDIFF_CPU_ISA", "sse4", "cpu_isa"),
    ("FASTDIFF_CPU_ROUTE", "zen3", "cpu_route"),
    ("FASTDIFF_CPU_BF16_MATH", "fp16", "cpu_bf16_math"),
    ("TRITON_INTERPRET", "maybe", "TRITON_INTERPRET"),
])
def test_bad_values_name_the_variable_and_the_choices(var, value, field):
    with pytest.raises(settings.SettingsError) as err:
        settings.from_environ({var: value})
    msg = str(err.value)
    assert var in msg and repr(value) in msg and field in msg and "\n" not in msg


def test_choices_agree_with_the_modules_that_use_them():
    assert settings.BACKENDS == PRIORITY
    assert set(settings.CPU_ROUTES) == set(routing.ROUTES)
    assert tuple(routing.ISA_FEATURES) == settings.ISA_LEVELS


def test_override_changes_and_restores():
    before = settings.current()
    with settings.override(backend="ref", cpu_bf16_math="fp32") as s:
        assert settings.current() is s and s.backend == "ref" and s.cpu_bf16_math == "fp32"
        with settings.override(backend="cpu"):
            assert settings.current().backend == "cpu" and settings.current().cpu_bf16_math == "fp32"
        assert settings.current().backend == "ref"
    assert settings.current() == before
    with pytest.raises(TypeError, match="unknown setting"):
        with settings.override(cpu_isaa="avx2"):
            pass
    with pytest.raises(settings.SettingsError, match="cpu_route"):
        with settings.override(cpu_route="nonsense"):
            pass
    assert settings.current() == before


def test_cpu_isa_override_reaches_the_kernels(cpu_isa):
    from fastdiff import _ext

    if not _ext.has_cpu_kernels():
        pytest.skip("compiled CPU kernels not built")
    assert _ext.cpu_capability() == cpu_isa


def test_an_isa_the_cpu_lacks_is_refused_and_nothing_changes():
    lacking = [isa for isa in settings.ISA_LEVELS if routing.missing_features(isa)]
    if not lacking:
        pytest.skip("this CPU has every instruction-set level")
    before = settings.current()
    with pytest.raises(settings.SettingsError, match=f"cpu_isa={lacking[0]}"):
        with settings.override(cpu_isa=lacking[0]):
            pass
    assert settings.current() == before


def test_environment_variables_take_effect_in_a_fresh_process(tmp_path):
    """The documented variables, set before the process starts, are what the settings and the ops see."""
    code = (
        "import torch\n"
        "from fastdiff import _ext, settings\n"
        "from fastdiff.ops import all_ops, routing\n"
        "from fastdiff.ops._onednn import bf16_math_dtype\n"
        "from fastdiff.eval.data import fashion_mnist_dir\n"
        "s = settings.current()\n"
        "assert all_ops()['group_norm'].select(torch.zeros(1, 4, 2, 2), 2, None, None, 1e-5) == 'ref'\n"
        "assert routing.current_route().name == 'avx512'\n"
        "assert bf16_math_dtype() == torch.float32\n"
        "assert str(fashion_mnist_dir()) == %r\n"
        "assert s.cache_dir is None and s.cpu_isa == 'scalar'\n"
        "assert not _ext.has_cpu_kernels() or _ext.cpu_capability() == 'scalar'\n"
        "print('ok')\n" % str(tmp_path))
    env = {"PATH": "/usr/bin:/bin", "FASTDIFF_BACKEND": "ref", "FASTDIFF_CPU_ROUTE": "avx512",
           "FASTDIFF_CPU_BF16_MATH": "fp32", "FASTDIFF_FASHION_MNIST": str(tmp_path), "FASTDIFF_CACHE": "off",
           "FASTDIFF_CPU_ISA": "scalar", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_a_bad_variable_fails_at_first_use_with_one_line():
    out = subprocess.run([sys.executable, "-c", "import torch, fastdiff.ops as ops\n"
                          "ops.group_norm(torch.zeros(1, 4, 2, 2), 2)"],
                         env={"PATH": "/usr/bin:/bin", "FASTDIFF_CPU_BF16_MATH": "fast"}, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode != 0
    assert "SettingsError: cpu_bf16_math (FASTDIFF_CPU_BF16_MATH) must be one of auto, native, fp32" in out.stderr
