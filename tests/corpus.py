"""Where CPython's email test corpus is (no tests here): real messages of
every shape, shipped with Python's own test suite, used by the unit test
that runs each through the pipeline and by the integration test that makes
each header of one of them 8-bit."""

from __future__ import annotations

import sysconfig
from pathlib import Path

CANDIDATES = [
    Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data",
    Path("/usr/lib/python3.11/test/test_email/data"),  # Debian's libpython3.11-testsuite
]
CORPUS_DIR = next((path for path in CANDIDATES if path.is_dir()), None)
CORPUS = sorted(p for p in CORPUS_DIR.glob("msg_*.txt")) if CORPUS_DIR else []
