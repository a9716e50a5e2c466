"""The jar lock that guards Kafka's and Tahu's jars: a jar missing, one not in the lock and one whose
bytes changed are each refused by name, and a malformed lock line names its file and line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ops import maven_jars
from ops.errors import UserError


def _jars(folder: Path, **jars: bytes) -> None:
    folder.mkdir(exist_ok=True)
    for name, data in jars.items():
        (folder / f"{name}.jar").write_bytes(data)


def test_verify_names_every_mismatch(tmp_path: Path) -> None:
    lock = tmp_path / "jars.lock"
    lock.write_text("# a comment\n" + "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}.jar\n"
        for name, data in {"a": b"A", "b": b"B", "c": b"C"}.items()
    ))  # fmt: skip
    libs = tmp_path / "libs"
    _jars(libs, a=b"A", b=b"B", c=b"C")
    maven_jars.verify(libs, lock, "kafka")  # exactly the lock: accepted
    (libs / "a.jar").unlink()
    _jars(libs, b=b"B-tampered", d=b"D")
    with pytest.raises(UserError) as refused:
        maven_jars.verify(libs, lock, "kafka")
    assert str(refused.value) == (
        f"kafka: the jars in {libs} do not match {lock} "
        "(missing: a.jar; not in the lock: d.jar; sha256 differs: b.jar)"
    )


def test_a_malformed_lock_line_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "jars.lock"
    lock.write_text(f"{'0' * 64}  good.jar\nnot-a-digest  bad.jar\n")
    with pytest.raises(UserError, match=rf"Tahu: {lock}:2: expected '<sha256>  <jar>'"):
        maven_jars.read_lock(lock, "Tahu")


def test_the_kafka_lock_matches_the_cached_jars() -> None:
    """The repository's own lock is well formed and names the jars the broker runs on."""
    from ops.kafka_broker import LOCK, kafka_libs

    maven_jars.verify(kafka_libs(), LOCK, "kafka")
