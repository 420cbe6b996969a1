"""Running a `crypto-client` command to its end, and what its failure must look like."""

import subprocess
from pathlib import Path

from tests.support import launcher
from tests.support.services import crypto_client


def run(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return launcher.run(
        crypto_client(*args),
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr  # the problem, and a hint
    assert lines[0].startswith("crypto-client: ")
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr
