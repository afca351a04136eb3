"""`import var_jax` chooses XLA's own CPU convolutions (var_jax/__init__.py) unless XLA_FLAGS already decides."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

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
