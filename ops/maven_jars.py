"""Java dependencies fetched from Maven Central, pinned by a pom and checked against a lock.

One place for the rule the broker and the test peers share: ``mvn dependency:copy-dependencies``
into a staging directory, every jar's sha256 compared with a ``sha256sum``-style lock (nothing
missing, nothing extra, nothing changed), then an atomic rename into the cache. Concurrent callers
(parallel tests, two stacks) wait on a file lock for one fetch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from ops.errors import UserError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_lock(lock: Path, what: str) -> dict[str, str]:
    """jar file name → sha256, from ``sha256sum``-style lines."""
    entries: dict[str, str] = {}
    for n, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise UserError(f"{what}: {lock}:{n}: expected '<sha256>  <jar>', got {line!r}")
        entries[name] = digest
    return entries


def lock_lines(libs: Path) -> list[str]:
    """The lock's lines for the jars in ``libs`` (to write a new lock after a version change)."""
    return [f"{sha256(p)}  {p.name}" for p in sorted(libs.glob("*.jar"))]


def mvn_copy(pom: Path, out: Path, what: str, mvn: str | None = None) -> None:
    """Copy the runtime jars ``pom`` resolves to into ``out``."""
    exe = mvn or shutil.which("mvn")
    if exe is None:
        raise UserError(f"{what}: Maven (mvn) is needed to fetch the jars once; `apt-get install maven`")
    argv = [exe, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
            f"-DoutputDirectory={out}", "-DincludeScope=runtime"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"{what}: cannot run Maven ({' '.join(argv)}): {exc}") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise UserError(f"{what}: Maven could not fetch the jars of {pom}: {' | '.join(tail)}")


def verify(libs: Path, lock: Path, what: str) -> None:
    expected: Mapping[str, str] = read_lock(lock, what)
    present = {p.name for p in libs.glob("*.jar")}
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    wrong = sorted(n for n in set(expected) & present if sha256(libs / n) != expected[n])
    if missing or extra or wrong:
        parts = [f"{label}: {', '.join(names)}" for label, names in
                 (("missing", missing), ("not in the lock", extra), ("sha256 differs", wrong)) if names]
        raise UserError(f"{what}: the jars in {libs} do not match {lock} ({'; '.join(parts)})")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def verified_jars(pom: Path, lock: Path, libs: Path, what: str, *, mvn: str | None = None) -> Path:
    """``libs`` holding exactly the locked jars of ``pom``; fetched with Maven the first time.

    Key ``libs`` by the pom and the lock (the callers do), so changing either fetches afresh."""
    marker = libs / ".verified"
    if marker.exists():
        return libs
    cache = libs.parent
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / ".fetch.lock"):
        if marker.exists():
            return libs
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=cache))
        try:
            mvn_copy(pom, staging, what, mvn)
            verify(staging, lock, what)
            (staging / ".verified").write_text(f"{what} verified against {lock.name}\n")
            if libs.exists():
                shutil.rmtree(libs)
            staging.rename(libs)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return libs
