"""Eight CPU devices for every test, so one process compares 1-device and 8-device sharding.

XLA reads the flag when JAX starts, so it is set before anything imports jax.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
