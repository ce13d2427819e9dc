"""``python -m loom.cli`` runs the ``loom`` command."""

from loom.cli.app import app

app()
