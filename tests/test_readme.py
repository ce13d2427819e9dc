"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"## Set-up.*?(?=\n## )", (ROOT / "README.md").read_text(), flags=re.S)[0]
    return re.findall(r"```bash\n(.*?)\n```", blocks, flags=re.S)


def test_ci_runs_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()
    assert "loom plan" in install_and_run and "pytest" in install_and_test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def test_readme_names_every_catalogue_model():
    from loom.profiles.catalogue import model_names

    text = (ROOT / "README.md").read_text()
    assert all(name in text for name in model_names())
