"""The quiet terminal's gate goes on the consoles libraries print to, not on a handler that collects records
in memory (pytest's caplog): a test that reads a library's log records still sees them after a `dpo`
command configured logging in the same process."""

from __future__ import annotations

import io
import logging
import sys

from pipeline.runtime import logs


def test_the_gate_takes_consoles_and_leaves_in_memory_collectors_alone():
    library = logging.getLogger("raydpo.test.library")
    console = logging.StreamHandler(sys.__stderr__)
    collector = logging.StreamHandler(io.StringIO())
    library.addHandler(console)
    library.addHandler(collector)
    try:
        assert logs.writes_to_a_console(console) and not logs.writes_to_a_console(collector)
        logs.gate_library_consoles()
        assert any(isinstance(f, logs._Gate) for f in console.filters)
        assert collector.filters == []
    finally:
        library.removeHandler(console)
        library.removeHandler(collector)
