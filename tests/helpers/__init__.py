"""What the tests share that is not a fixture: tiny models and data written to disk, scripted servers, the
train step run without Ray. Imported as `tests.helpers.<module>` (pyproject's pytest `pythonpath` puts the
repository root on the path); fixtures live in the conftest.py files, test modules import no other test module."""
