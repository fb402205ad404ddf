"""What every test process shares: one CPU device unless a test asks for more, and JAX's persistent
compilation cache.

A test marked ``@pytest.mark.devices(n)`` needs ``n`` devices. XLA fixes the device count when JAX
starts, so in a process with fewer (the default: one, as a user's CPU has) the test runs again in a
child pytest with ``--xla_force_host_platform_device_count=n``, and passes or fails as it does there.

The compilation cache (``JAX_COMPILATION_CACHE_DIR``, default a folder in the temp dir) is shared by
the pytest-xdist workers and every subprocess the tests start: a step compiled once is loaded after.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DEVICE_FLAG = "--xla_force_host_platform_device_count"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jlora-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

ROOT = Path(__file__).resolve().parent.parent


def device_env(devices: int) -> dict:
    """This process's environment with ``devices`` simulated CPU devices instead of its own count."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"])}


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("devices")
    if marker is None:
        return None
    import jax

    wanted = marker.args[0]
    if jax.device_count() >= wanted:
        return None  # run here
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
         f"--rootdir={ROOT}", pyfuncitem.nodeid],
        cwd=ROOT, env=device_env(wanted), capture_output=True, text=True, timeout=900)
    if child.returncode != 0 or " passed" not in child.stdout:
        pytest.fail(f"on {wanted} devices (a child pytest):\n{child.stdout[-6000:]}\n{child.stderr[-2000:]}",
                    pytrace=False)
    return True
