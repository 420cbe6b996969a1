"""A real, size-limited filesystem a test can fill up: a tmpfs mounted into a temporary
directory (needs root, as the sandbox and CI run), unmounted at the end. The kernel, not the
test, refuses the writes: SQLite sees the ENOSPC a full disk gives it."""

import contextlib
import errno
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.services import unavailable

_FILLER = "filler"


class SmallFilesystem:
    def __init__(self, size_bytes: int) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="cc-small-fs-"))
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0777", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            shutil.rmtree(self.path, ignore_errors=True)
            unavailable(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")

    def fill(self) -> int:
        """Take every free byte (down to the filesystem's block); returns how many."""
        taken = 0
        with (self.path / _FILLER).open("ab", buffering=0) as filler:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
                while True:
                    try:
                        taken += filler.write(b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return taken

    def free(self) -> None:
        """Give the space `fill` took back."""
        (self.path / _FILLER).unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "SmallFilesystem":
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
