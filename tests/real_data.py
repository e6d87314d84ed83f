"""Where the real Earth-observation samples the tests read live: ``tests/data/real/`` (shipped with the
repository, 5.6 MB; what each file is, its source and licence: ``tests/data/real/README.md``)."""

from __future__ import annotations

from pathlib import Path

REAL = Path(__file__).resolve().parent / "data" / "real"
