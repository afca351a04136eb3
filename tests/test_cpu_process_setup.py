"""What var-jax sets up for a CPU process: XLA's own convolutions (`import var_jax`, unless XLA_FLAGS decides) and,
for the var-jax command only, a restart with glibc's huge-pages tunable (var_jax/host_memory.py)."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from var_jax.host_memory import HUGE_PAGES_TUNABLE, is_var_jax_command

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CODE = ("import os, var_jax, jax, jax.numpy as jnp\n"
        "x = jnp.ones((1, 8, 8, 4)); k = jnp.ones((3, 3, 4, 4))\n"
        "y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
        "print(os.environ.get('XLA_FLAGS', ''), '|', jax.device_count(), float(y[0, 4, 4, 0]))")


def flags_after_import(xla_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=300, check=True).stdout.strip()
    flags, rest = out.rsplit("|", 1)
    devices, centre = rest.split()
    assert float(centre) == 36.0   # 3x3 taps x 4 channels of ones: the conv runs with the flags given
    return flags.strip(), int(devices)


@pytest.mark.skipif(not importlib.metadata.version("jaxlib").startswith("0.10."),
                    reason="the flag is only set for the jaxlib versions it was tested with (0.10.x)")
def test_import_prefers_xla_convolutions_on_cpu_and_keeps_the_users_flags():
    assert flags_after_import(None) == (f"{FLAG}=-individual_convolution", 1)
    flags, devices = flags_after_import("--xla_force_host_platform_device_count=2")
    assert flags == f"--xla_force_host_platform_device_count=2 {FLAG}=-individual_convolution" and devices == 2
    assert flags_after_import(f"{FLAG}=+eltwise") == (f"{FLAG}=+eltwise", 1)   # the user's own choice stands


def test_only_the_var_jax_command_restarts():
    assert is_var_jax_command(["python", "-m", "var_jax", "train"])
    assert is_var_jax_command(["python3", "-X", "importtime", "-m", "var_jax"])
    assert is_var_jax_command(["/usr/bin/python", "/venv/bin/var-jax", "sample"])
    assert not is_var_jax_command(["python", "-m", "pytest", "tests"])
    assert not is_var_jax_command(["python", "-c", "import var_jax"])
    assert not is_var_jax_command(["python", "train.py", "-m", "var_jax_like"])


RESTART = "import os, var_jax.host_memory as h; h.restart_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are a Linux/glibc feature")
@pytest.mark.parametrize("before, after", [
    (None, HUGE_PAGES_TUNABLE),
    ("glibc.malloc.trim_threshold=1", f"glibc.malloc.trim_threshold=1:{HUGE_PAGES_TUNABLE}"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),   # the user opted out
])
def test_restart_adds_the_tunable_once(before, after):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if before is not None:
        env["GLIBC_TUNABLES"] = before
    out = subprocess.run([sys.executable, "-c", RESTART], env=env, capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=300, check=True).stdout
    assert out.splitlines() == [after]   # one line: the first process was replaced, the restarted one printed
