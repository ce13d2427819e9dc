"""The ``loom`` command line: parsing, rendering and exit codes only."""
