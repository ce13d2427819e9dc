"""The README's commands are the ones that work: its set-up is what CI runs,
and its examples run through a shell exactly as printed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Commands the suite does not run, each with why. Every other line of every
# bash block in the README runs in test_readme_examples_run_as_printed.
EXCUSED = {
    "pip install": "the set-up: CI runs it on a fresh machine (test_ci_runs_the_readme_test_command)",
    "torchrun": "measures links between GPUs of several processes",
    "loom profile layers": "an 8B model's layers at four TP sizes: minutes on a CPU (tests/test_profile_layers.py runs small ones)",
    "loom profile gemm": "an 8B model's GEMMs: minutes on a CPU (tests/test_profile_layers.py runs small ones)",
    "loom plan examples/llama3-8b-h100.yaml --profile": "needs the profiles above (measured layers and GEMMs, or a calibration)",
    "python -m sglang": "SGLang's server, not loom",
    "loom compare plans/": "needs a trial's training log (tests/test_run_logs.py compares logs written from Megatron's format strings)",
    "loom calibrate examples/": "needs the trials' training logs (tests/test_run_logs.py calibrates from written logs)",
}


def bash_blocks() -> list[tuple[str, list[str]]]:
    """(section heading, command lines) of every ```bash block, in order."""
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)\n```", README, flags=re.S):
        heading = re.findall(r"^#+ (.+)$", README[: match.start()], flags=re.M)[-1]
        blocks.append((heading, [line for line in match.group(1).splitlines() if line.strip()]))
    return blocks


def readme_commands() -> list[str]:
    return ["\n".join(lines) for heading, lines in bash_blocks() if heading == "Set-up"]


def test_ci_runs_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()
    assert "loom plan" in install_and_run and "pytest" in install_and_test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def test_readme_names_every_catalogue_model():
    from loom.profiles.catalogue import model_names

    assert all(name in README for name in model_names())


def _prepare(folder: Path) -> None:
    """What the examples read that a user would have: the examples folder,
    nccl-tests logs and expert loads (small, made here)."""
    (folder / "examples").symlink_to(ROOT / "examples")
    logs = ROOT / "tests" / "data" / "nccl-tests"
    shutil.copy(logs / "all_reduce_perf-2x8-h100.log", folder / "all_reduce_perf.log")
    shutil.copy(logs / "sendrecv_perf-node000-node001.log", folder / "sendrecv_perf.log")
    rng = np.random.default_rng(0)
    loads = rng.zipf(1.5, (2, 256)).astype(float)  # 2 MoE layers of DeepSeek-V3's 256 experts
    np.save(folder / "loads.npy", loads)
    (folder / "loads.json").write_text(json.dumps(loads.tolist()))
    np.save(folder / "topk_ids.npy", rng.random((200, 2, 256)).argsort(axis=2)[:, :, :8])  # 200 tokens' 8 distinct experts per layer


def test_readme_examples_run_as_printed(tmp_path):
    """Each command line of the README's bash blocks, through bash in a
    folder holding what it reads, exits 0; the rest are excused above."""
    _prepare(tmp_path)
    loom = Path(sys.executable).with_name("loom")
    env = {"PATH": f"{loom.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "80"}
    run = [line for _, lines in bash_blocks() for line in lines if not any(line.startswith(prefix) for prefix in EXCUSED)]
    assert any(line.startswith("loom explain") for line in run) and any(line.startswith("loom profile nccl-tests") for line in run)
    for line in run:
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "plan.json").is_file() and (tmp_path / "schedule.png").stat().st_size > 0
    assert (tmp_path / "nccl.json").is_file() and (tmp_path / "experts" / "expert_location.json").is_file()


@pytest.mark.parametrize("prefix", EXCUSED)
def test_every_excuse_still_excuses_a_readme_command(prefix):
    assert any(line.startswith(prefix) for _, lines in bash_blocks() for line in lines)
