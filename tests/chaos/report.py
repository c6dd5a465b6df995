"""Tables the chaos suite prints at the end of the pytest run (``conftest.py``'s hook)."""

REPORTS: list[str] = []
