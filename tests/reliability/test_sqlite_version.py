"""The SQLite that apsw bundles is outside the WAL-reset bug range (guide R16, S14).

The bug is in every SQLite from 3.7.0 through 3.51.2; it is fixed in 3.51.3 and in the
backports 3.44.6 and 3.50.7.
"""

from __future__ import annotations

import pytest

from turnbuckle.adapters.sqlite import sqlite_version, wal_reset_bug_fixed


def test_bundled_sqlite_is_outside_the_wal_reset_bug_range() -> None:
    version = sqlite_version()
    assert version.count(".") >= 2, version
    assert wal_reset_bug_fixed(version), f"apsw bundles SQLite {version}, inside the bug range"


@pytest.mark.parametrize(
    ("version", "fixed"),
    [
        ("3.6.23", True),  # before the bug was introduced
        ("3.6.23.1", True),
        ("3.7.0", False),  # the first affected version
        ("3.7.17", False),
        ("3.40.1", False),
        ("3.44.5", False),
        ("3.44.6", True),  # backport
        ("3.44.9", True),
        ("3.45.0", False),  # a later branch without the backport
        ("3.45.3", False),
        ("3.50.6", False),
        ("3.50.7", True),  # backport
        ("3.51.0", False),
        ("3.51.2", False),  # the last affected version
        ("3.51.3", True),  # the fix
        ("3.52.0", True),
        ("3.54.1", True),
        ("4.0.0", True),
    ],
)
def test_wal_reset_bug_fixed_boundaries(version: str, fixed: bool) -> None:
    assert wal_reset_bug_fixed(version) is fixed
