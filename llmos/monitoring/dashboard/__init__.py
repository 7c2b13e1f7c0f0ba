"""The dashboard's data: panel queries (`panels`), its login sessions (`session`), its page (`static/`).

The routes are llmos/api/routes/dashboard.py; docs/dashboard.md says what each panel shows and
which index serves its query.
"""

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
"""The page's files (HTML, JS, CSS), shipped as package data: nothing is loaded from elsewhere."""
