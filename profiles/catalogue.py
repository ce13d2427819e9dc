"""Look up the bundled catalogues: GPU types (``gpus.yaml``) and model configs
(``models/*.json``, Hugging Face ``config.json`` files)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import yaml

from loom.planner.specs.errors import SpecError

CATALOGUE_DIR = Path(__file__).parent
MODELS_DIR = CATALOGUE_DIR / "models"
GPUS_FILE = CATALOGUE_DIR / "gpus.yaml"
GiB = 1024**3


# Training precisions that run on another precision's tensor-core peak:
# NVFP4 (E2M1 values, an E4M3 scale per 16, Transformer Engine's
# NVFP4BlockScaling) on the fp4 tensor cores.
PEAK_OF = {"nvfp4": "fp4"}
# The large-GEMM efficiency an NVFP4 GEMM is priced at where gpus.yaml gives
# none: fp8's [assumed: NVIDIA publishes no sustained NVFP4 training GEMM
# efficiency; cuBLASLt's block-scaled fp8 and fp4 kernels share one design].
NVFP4_EFFICIENCY_FROM = "fp8"


# CPU time to issue one PyTorch op from Python on an x86 training host:
# torch.nn.Linear's forward took 13.48 us of CPU per call on a DGX H100
# (Xeon 8480C) (TransformerEngine issue #2053, table: BF16, hidden 2048,
# 8192 tokens). Grace hosts are slower per op (gpus.yaml host_op_us).
X86_HOST_OP_S = 13.48e-6


@dataclass(frozen=True, eq=False)
class GPU:
    """One GPU type: what it can compute and hold. Entries are unique per
    catalogue name, so identity is equality (and kernel times can be cached)."""

    name: str
    memory_bytes: int  # torch's total_memory: what the allocator can hand out (gpus.yaml)
    hbm_GBps: float
    sms: int
    peak_tflops: dict[str, float | None]  # by precision: fp16, bf16, fp8
    gemm_efficiency: dict[str, float | None]
    attention_efficiency: float
    # FlashAttention-2's sustained fraction of 16-bit peak, where it differs
    # from attention_efficiency's kernel (None: the same; gpus.yaml).
    flash2_attention_efficiency: float | None = None
    pcie_GBps: float = 0.0  # the host link, per direction
    host_memory_GBps: float = 0.0  # the host's DRAM bandwidth per GPU (gpus.yaml)
    # Fitted by `loom profile gemm` (--profile): the GEMM curve's K overhead
    # (None: planner/cost/efficiency.py's default) and the profile it came from.
    gemm_k_overhead: float | None = None
    gemm_profile: str | None = None
    compute_capability: tuple[int, int] | None = None  # CUDA's; None for non-NVIDIA GPUs
    tdp_W: float | None = None  # the board power its peak figures are sustained at (gpus.yaml)
    power_limit_W: float | None = None  # the cluster's power cap (None: the TDP; power_limited)
    # From a calibration profile (loom calibrate, --profile): the multiplier on
    # the HBM streaming efficiency (planner/cost/efficiency.py caps the result
    # at the bandwidth), the framework memory the runs held beyond loom's
    # model, and what was applied from where.
    hbm_efficiency_factor: float = 1.0
    memory_overhead_bytes: float = 0.0
    calibration: str | None = None
    host_op_s: float = X86_HOST_OP_S  # the system's CPU time to issue one PyTorch op from Python (gpus.yaml host_op_us)

    @property
    def kind(self) -> str:
        """The GPU type as the cluster runs it: its name, and its power cap
        where one is set (GPUs of one kind are interchangeable)."""
        return self.name if self.power_limit_W is None else f"{self.name}@{self.power_limit_W:g}W"

    @property
    def clock_fraction(self) -> float:
        """The fraction of its TDP clock a power-capped GPU keeps on
        compute-bound kernels: dynamic power is C V^2 f and, inside the DVFS
        range, the voltage follows the clock, so power goes as f^3 and the
        clock as (limit / TDP)^(1/3) (Hennessy & Patterson, Computer
        Architecture, 6th ed., sec. 1.5) [assumed: static power and the
        voltage floor ignored]. At 500 of 700 W that is 0.894, inside the
        bracket torchtitan's authors give for their 500 W H100s ("between SXM
        and NVL", 835-989 TFLOP/s: pytorch/torchtitan
        benchmarks/llama3_h100_202412_torchtitan.md). HBM keeps its clock, so
        memory-bound kernels are not slowed."""
        if self.power_limit_W is None or self.tdp_W is None:
            return 1.0
        return min(1.0, (self.power_limit_W / self.tdp_W) ** (1 / 3))

    @property
    def fp8_gemm_any_layout(self) -> bool:
        """Blackwell's fp8 GEMMs take either operand layout, so Transformer
        Engine keeps one fp8 copy of a tensor where Hopper needs a row-wise
        copy and a transpose (TE utils.py is_non_tn_fp8_gemm_supported:
        10.0 <= capability < 12.0, or >= 13.0)."""
        cc = self.compute_capability
        return cc is not None and ((10, 0) <= cc < (12, 0) or cc >= (13, 0))

    @property
    def cublas_workspace_bytes(self) -> int:
        """One cuBLAS workspace: 32 MiB on Hopper and later, 4 MiB before
        (Transformer Engine's get_cublas_workspace_size_bytes; PyTorch's
        CublasHandlePool.cpp picks 32 MiB for sm90 as well)."""
        return 32 * 2**20 if self.compute_capability is not None and self.compute_capability >= (9, 0) else 4 * 2**20

    def peak_flops(self, precision: str) -> float:
        """Dense tensor-core FLOP/s at ``precision`` (nvfp4 on the fp4 tensor cores)."""
        return self.peak_tflops[PEAK_OF.get(precision, precision)] * 1e12

    def supports(self, precision: str) -> bool:
        """Whether the GPU has tensor cores for ``precision``; NVFP4 block
        scaling is NVIDIA Blackwell's (compute capability 10.0 and up)."""
        if precision == "nvfp4" and (self.compute_capability is None or self.compute_capability < (10, 0)):
            return False
        return self.peak_tflops.get(PEAK_OF.get(precision, precision)) is not None


def _with_nvfp4(entry: dict) -> dict[str, float | None]:
    """A gpus.yaml entry's GEMM efficiencies, with nvfp4's where the GPU has fp4 tensor cores."""
    efficiency = dict(entry["gemm_efficiency"])
    if entry["peak_tflops"].get("fp4") and entry.get("compute_capability") and "nvfp4" not in efficiency:
        efficiency["nvfp4"] = efficiency.get(NVFP4_EFFICIENCY_FROM)
    return efficiency


@cache
def _gpu_table() -> dict[str, GPU]:
    raw = yaml.safe_load(GPUS_FILE.read_text())
    table: dict[str, GPU] = {}
    for name, entry in raw.items():
        gpu = GPU(
            name=name,
            memory_bytes=int(entry["memory_GiB"] * GiB),
            hbm_GBps=float(entry["hbm_GBps"]),
            sms=int(entry["sms"]),
            peak_tflops=dict(entry["peak_tflops"]),
            gemm_efficiency=_with_nvfp4(entry),
            attention_efficiency=float(entry["attention_efficiency"]),
            flash2_attention_efficiency=float(entry["flash2_attention_efficiency"]) if entry.get("flash2_attention_efficiency") else None,
            pcie_GBps=float(entry["pcie_GBps"]),
            host_memory_GBps=float(entry["host_memory_GBps"]),
            compute_capability=tuple(entry["compute_capability"]) if entry.get("compute_capability") else None,
            tdp_W=float(entry["tdp_W"]) if entry.get("tdp_W") else None,
            host_op_s=float(entry["host_op_us"]) * 1e-6 if entry.get("host_op_us") else X86_HOST_OP_S,
        )
        for key in [name, *entry.get("aliases", [])]:
            table[key.lower()] = gpu
    return table


def gpu_names() -> list[str]:
    return sorted({gpu.name for gpu in _gpu_table().values()})


def find_gpu(name: str, source: str = "cluster", field: str = "gpu") -> GPU:
    """The catalogue entry for ``name`` (case-insensitive, aliases allowed)."""
    gpu = _gpu_table().get(str(name).lower())
    if gpu is None:
        raise SpecError(source, field, f"a GPU from the catalogue ({', '.join(gpu_names())})", name)
    return gpu


# The lowest power limit a data-centre GPU accepts, as a share of its TDP
# (nvidia-smi -q's "Min Power Limit": 100 of 400 W on A100 SXM4, 200 of
# 700 W on H100 SXM5) [assumed for the others].
MIN_POWER_SHARE = 0.25


@cache
def power_limited(gpu: GPU, power_limit_W: float | None) -> GPU:
    """``gpu`` run under a power cap of ``power_limit_W`` watts (None: its
    TDP): one object per pair, so identity stays equality. Raises ValueError
    when the catalogue has no TDP for it or the cap lies outside
    [MIN_POWER_SHARE x TDP, TDP]."""
    if power_limit_W is None:
        return gpu
    if gpu.tdp_W is None:
        raise ValueError(f"no power limit: loom's catalogue has no TDP for {gpu.name}")
    if power_limit_W > gpu.tdp_W:
        raise ValueError(f"at most {gpu.tdp_W:g} W, the TDP of {gpu.name}")
    if power_limit_W < MIN_POWER_SHARE * gpu.tdp_W:
        raise ValueError(f"at least {MIN_POWER_SHARE * gpu.tdp_W:g} W on {gpu.name}: a quarter of its TDP, below what the driver lets a limit go")
    return replace(gpu, power_limit_W=float(power_limit_W))


def model_names() -> list[str]:
    return sorted(path.stem for path in MODELS_DIR.glob("*.json"))


def model_config_path(name: str) -> Path | None:
    """The bundled config file for catalogue name ``name``, if there is one."""
    path = MODELS_DIR / f"{name.lower()}.json"
    return path if path.is_file() else None
