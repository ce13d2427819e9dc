"""The calibration profile (``kind: calibration``): what ``loom calibrate``
learnt from real runs of one GPU type, and ``--profile`` applies.

A calibration is a handful of bounded factors on the cost model's inputs,
never a correction of one layout's answer:

- ``gemm``, ``attention``, ``elementwise``: multipliers on the rates loom
  assumes for the GPU (``gemm_efficiency`` at ``precision``,
  ``attention_efficiency``, the HBM streaming efficiency of memory-bound
  kernels), each capped at the hardware's peak when applied. 1.10 means the
  runs' kernels ran 10% faster than loom assumed. From profiler traces each
  is measured on its own (kernel time by kind), and the runs' step times are
  then not fitted (what remains between calibrated and measured is not in
  the kernels: communication, the bubble, the host); from logs alone one
  factor, fitted to the step times, stands for all three;
- ``nvlink``, ``network``: multipliers on the collective efficiency of the
  cluster's links (``Node.nvlink_efficiency``, ``nic_efficiency``), measured
  from a trace's tensor-parallel collectives on the link their group spans;
  applied to the cluster the runs ran on (``cluster``) only;
- ``memory_overhead_bytes``: what the framework held beyond loom's memory
  model on the runs' fullest GPU (never below 0: a calibration never lets a
  plan use memory loom's model says is taken), applied to jobs of the same
  ``framework`` only.

Each factor lies in [FACTOR_MIN, FACTOR_MAX]: a run that needs more is not
the run the plan describes (another layout, a straggler, a broken link), and
``loom calibrate`` refuses it rather than learn it. ``runs`` records, per run,
the logs it came from and the step time before and after.

``schema_version`` 1; the pydantic models below are the single definition and
``calibration.schema.json`` beside this module is generated from them
(``python -m loom.profiles.calibration``; a test keeps it in sync).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import pydantic

from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import StrictModel, read_json, validate
from loom.profiles.catalogue import find_gpu

SCHEMA_FILE = Path(__file__).with_name("calibration.schema.json")
# The widest correction a calibration may make to a rate (assumed: loom's
# published-run errors lie within +-30% on dense and MoE rows alike, so a
# factor of 2 either way is a run the model cannot be describing).
FACTOR_MIN = 0.5
FACTOR_MAX = 2.0
# The largest memory overhead learnt, as a fraction of the GPU's capacity.
MEMORY_OVERHEAD_MAX_FRACTION = 0.25

FactorValue = Annotated[float, pydantic.Field(ge=FACTOR_MIN, le=FACTOR_MAX, allow_inf_nan=False)]
Amount = Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]


class Factor(StrictModel):
    """One learnt multiplier on a rate loom assumes."""

    value: FactorValue = pydantic.Field(description="measured rate / loom's rate (1 = loom was right)")
    source: str = pydantic.Field(min_length=1, description="what it was measured from, e.g. 'step time of 2 runs'")


class CalibratedRun(StrictModel):
    """One run the calibration learnt from."""

    plan: str = pydantic.Field(description="the plan.json the run ran")
    logs: list[str] = pydantic.Field(min_length=1)
    model: str
    layout: str
    tokens_per_step: Amount = pydantic.Field(description="global batch x sequence length")
    measured_step_time_s: Amount
    predicted_step_time_s: Amount = pydantic.Field(description="loom's prediction before calibrating")
    calibrated_step_time_s: Amount = pydantic.Field(description="with the calibration applied")
    measured_peak_bytes: Amount | None = None
    predicted_peak_bytes: Amount | None = pydantic.Field(default=None, description="comparable with the measured figure "
                                                         "(what PyTorch's allocator holds), before calibrating")


class CalibrationDocument(StrictModel):
    """A calibration profile (module docstring): what it holds for, the
    factors learnt (None: not learnt, loom's estimate stands) and the runs."""

    schema_version: Literal[1]
    kind: Literal["calibration"]
    gpu: str = pydantic.Field(description="the catalogue GPU the runs ran on")
    precision: str = pydantic.Field(description="the runs' precision: the GEMM factor holds at it only")
    framework: str = pydantic.Field(description="the runs' framework: the memory overhead holds for it only")
    cluster: str = pydantic.Field(description="the runs' cluster: the link factors hold on it only")
    gemm: Factor | None = None
    attention: Factor | None = None
    elementwise: Factor | None = None
    nvlink: Factor | None = None
    network: Factor | None = None
    memory_overhead_bytes: Amount = 0.0
    runs: list[CalibratedRun] = pydantic.Field(description="what it was learnt from (at least one run in a file loom reads)")


def read_calibration(path: Path) -> CalibrationDocument:
    """A calibration profile, validated: every factor within its bounds, a
    catalogue GPU, a memory overhead within MEMORY_OVERHEAD_MAX_FRACTION of it.

    Raises SpecError naming ``path`` and the field."""
    document = validate(CalibrationDocument, read_json(path, "calibration profile (loom calibrate)"), str(path))
    if not document.runs:
        raise SpecError(str(path), "runs", "the runs the calibration was learnt from (at least one)", [])
    gpu = find_gpu(document.gpu, str(path), "gpu")
    limit = MEMORY_OVERHEAD_MAX_FRACTION * gpu.memory_bytes
    if document.memory_overhead_bytes > limit:
        raise SpecError(str(path), "memory_overhead_bytes", f"at most {MEMORY_OVERHEAD_MAX_FRACTION:.0%} of a {gpu.name}'s "
                        f"{gpu.memory_bytes / 2**30:.1f} GiB", document.memory_overhead_bytes)
    return document


def calibration_json(document: CalibrationDocument) -> str:
    """The profile file's text."""
    return json.dumps(document.model_dump(mode="json"), indent=1) + "\n"


def schema_json() -> str:
    """calibration.schema.json's text, generated from the models."""
    return json.dumps(CalibrationDocument.model_json_schema(), indent=1) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(schema_json())
