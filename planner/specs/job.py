"""The job spec: what to train (model), where (cluster), on what batch, and
which knobs the search may turn. Read from YAML; CLI flags override fields.

Example (``examples/llama3-8b-h100.yaml``)::

    model: llama-3-8b              # catalogue name or path to a config.json
    cluster: h100-64.yaml          # path (relative to this file) or inline mapping
    global_batch_size: 512
    seq_length: 8192
    precision: bf16                # bf16 | fp16 | fp8 | mxfp8 | nvfp4 | tf32 | fp32
    framework: megatron            # megatron | deepspeed | torchtitan
    search: {recompute: [none, selective]}   # any knob not given is "auto"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, get_args

import pydantic

from loom.planner.specs.cluster import Cluster, load_cluster, parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import StrictModel, count, rate, read_json, read_mapping, validate, why_missing
from loom.planner.specs import torchtitan
from loom.planner.specs.headroom import DEFAULT_FRACTION, DEFAULT_HEADROOM, MemoryHeadroom, parse_headroom
from loom.planner.specs.model import MoE, ModelSpec, load_model
from loom.planner.specs.stacks import DEFAULT_STACK, FRAMEWORK_STACK, STACKS
from loom.profiles.calibration import CalibrationDocument, read_calibration
from loom.profiles.catalogue import GPU, GiB, find_gpu
from loom.profiles.layer_profile import GemmDocument, LayersDocument, ModelDims, read_profile
from loom.profiles.links_profile import load_links_profile

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
DEFAULT_JOB = EXAMPLES_DIR / "llama3-8b-h100.yaml"

# What no job has (the error message states the limit): a million sequences
# in a step (published runs use up to ~16K), sequences of 16M tokens, parallel
# degrees beyond a million GPUs, micro batches of more than 1,024 sequences.
MAX_GLOBAL_BATCH, MAX_SEQ_LENGTH, MAX_DEGREE, MAX_MICRO_BATCH = 1 << 20, 1 << 24, 1 << 20, 1024
# A step of more tokens than this looks like a batch given in tokens, not sequences.
TOKENS_PER_STEP_WARNING = 1 << 30

# fp32 keeps weights and activations in fp32; tf32 too, with its GEMMs on
# TF32 tensor cores (PyTorch's allow_tf32; Transformer Engine's fp32 GEMMs
# always run so).
# mxfp8 is fp8 with features.fp8_recipe mxfp8 (read as such: _load_job).
Precision = Literal["bf16", "fp16", "fp8", "mxfp8", "nvfp4", "tf32", "fp32"]
FP32_PRECISIONS = ("tf32", "fp32")
Framework = Literal["megatron", "deepspeed", "torchtitan"]
Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8", "blockwise"]
CrossEntropyFusion = Literal["none", "native", "te", "torch"]
AttentionKernel = Literal["cudnn", "flash2"]
StackName = Literal["megatron-lm", "megatron-bridge", "torchtitan", "torchtitan-2412"]
# Megatron-Core's MoE token dispatchers (--moe-token-dispatcher-type, with
# flex's --moe-flex-dispatcher-backend): NCCL all-to-all, all-gather +
# reduce-scatter, or DeepEP's / HybridEP's fused kernels.
Dispatcher = Literal["alltoall", "allgather", "deepep", "hybridep"]


MAX_IMBALANCE = 1_000


def _ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 1 <= value <= MAX_IMBALANCE:
        raise ValueError(f"busiest/mean ratios from 1 to {MAX_IMBALANCE:,}: one, or a mapping of EP sizes to them")
    return float(value)


def _imbalance(value: object) -> float | tuple[tuple[int, float], ...]:
    """``moe_load_imbalance``: one ratio, or {ep size: ratio} kept as sorted
    (ep, ratio) pairs so that features stay hashable (costs are cached by them)."""
    if isinstance(value, (list, tuple)) and all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in value):
        value = dict(value)  # the pairs, read back from a report
    if not isinstance(value, dict):
        return _ratio(value)
    if not value:
        raise ValueError("a ratio, or a mapping of at least one EP size to a ratio")
    pairs = []
    for ep, ratio in value.items():
        if isinstance(ep, bool) or not isinstance(ep, int) or not 1 <= ep <= MAX_DEGREE:
            raise ValueError(f"EP sizes from 1 to {MAX_DEGREE:,} as the mapping's keys, not {ep!r}")
        pairs.append((ep, _ratio(ratio)))
    return tuple(sorted(pairs))


LoadImbalance = Annotated[float | tuple[tuple[int, float], ...], pydantic.PlainValidator(_imbalance)]


class Features(StrictModel):
    """Framework features that change the time and memory models, not the layout.

    Defaults are what Megatron-LM's own arguments run with current
    Megatron-Core and Transformer Engine (the ``megatron-lm`` stack); a job's
    ``stack`` presets them as another stack does (stacks.py), and set
    features win. Set them off to model an older stack (e.g. the 2021 SC'21
    runs had none)."""

    flash_attention: pydantic.StrictBool = True
    overlap_grad_reduce: pydantic.StrictBool = True  # --overlap-grad-reduce
    overlap_param_gather: pydantic.StrictBool = True  # --overlap-param-gather (distributed optimizer)
    tp_comm_overlap: pydantic.StrictBool = False  # --tp-comm-overlap (TE userbuffers)
    # MoE: the busiest GPU's routed tokens over the mean (1 = perfectly
    # balanced), one number or one per EP size ({8: 1.1, 16: 1.3}: what
    # `loom experts` prints for a loads file).
    moe_load_imbalance: LoadImbalance = 1.0
    # Megatron's gradient buffer in fp32 (--accumulate-allreduce-grads-in-fp32,
    # on by default for bf16) or in the parameters' dtype (--grad-reduce-in-bf16).
    grad_reduce_in_fp32: pydantic.StrictBool = True
    # Transformer Engine's fp8 scaling (--fp8-recipe): per-tensor delayed or
    # current ("tensorwise"), MXFP8 blocks of 32, or DeepSeek-style 128-blocks.
    fp8_recipe: Fp8Recipe = "delayed"
    # fp8 primary weights, all-gathered in fp8 (--fp8-param-gather; needs the
    # distributed optimizer): no bf16 copy of the GEMM weights.
    fp8_param_gather: pydantic.StrictBool = False
    # The loss: Megatron's unfused vocab-parallel cross-entropy, its native
    # fused one, or Transformer Engine's (--cross-entropy-loss-fusion
    # --cross-entropy-fusion-impl native|te).
    cross_entropy_fusion: CrossEntropyFusion = "none"
    # The flash-attention kernel: cuDNN's fused attention (Transformer
    # Engine's on Hopper and later, and torchtitan's first SDPA choice), or
    # FlashAttention-2, what PyTorch's scaled_dot_product_attention picked
    # before torch 2.9 made cuDNN its default on H100 (pytorch/pytorch#162073).
    attention_kernel: AttentionKernel = "cudnn"
    # Adam's moments in fp32, or in bf16 (Megatron's precision-aware
    # optimizer: --exp-avg-dtype/--exp-avg-sq-dtype bf16, its fp32 master kept
    # as 16-bit remainders beside the bf16 weights; torchtitan's
    # training.dtype bfloat16: every weight, gradient and moment in bf16).
    optimizer_states: Literal["fp32", "bf16"] = "fp32"
    # Attention called on K and V repeated to every query head (torchtitan
    # 9dec370 models/llama/model.py repeat_kv before SDPA); False: the kernel
    # reads the grouped heads itself (TE; torchtitan 0.2.2's enable_gqa).
    repeat_kv: pydantic.StrictBool = False
    # torch.distributed.pipelining keeps every micro batch's stage output
    # until the next step: torch 2.6's PipelineStage.forward_one_chunk
    # appends it to output_chunks on every stage (torchtitan 9dec370's
    # torch); torch 2.13 only when the schedule returns outputs, which
    # torchtitan 0.2.2 asks not to (train.py: return_outputs=False).
    pipeline_keeps_outputs: pydantic.StrictBool = False
    # torchtitan's AdamW as one fused kernel (torch.optim.AdamW fused=True,
    # 0.2.2's Optimizer.implementation default) or as foreach kernels
    # (9dec370's optimizer.py: fused off, foreach on).
    fused_optimizer: pydantic.StrictBool = True
    # MoE (megatron-core 0.16 transformer/moe/): the token dispatcher; a
    # capacity factor drops each expert's tokens beyond capacity_factor x its
    # even share (None: dropless), and padding every expert to capacity gives
    # static shapes (no per-layer device-to-host sync); the fused router and
    # permutation kernels (--moe-router-fusion, --moe-permute-fusion); the
    # all-to-all hidden behind another micro batch's compute
    # (--overlap-moe-expert-parallel-comm with --delay-wgrad-compute) and the
    # shared experts run beside the all-to-all (--moe-shared-expert-overlap).
    moe_token_dispatcher: Dispatcher = "alltoall"
    moe_expert_capacity_factor: rate(1_000, minimum=0.0) | None = None
    moe_pad_expert_input_to_capacity: pydantic.StrictBool = False
    moe_router_fusion: pydantic.StrictBool = False
    moe_permute_fusion: pydantic.StrictBool = False
    overlap_moe_expert_parallel_comm: pydantic.StrictBool = False
    moe_shared_expert_overlap: pydantic.StrictBool = False
    # The routed experts' grouped GEMMs at the job's fp8 or nvfp4 precision,
    # as Transformer Engine's GroupedLinear runs them; torchtitan's float8 and
    # mx converters quantize nn.Linear only and leave its GroupedExperts in
    # bf16 (its quantize.grouped_mm converters are torchao prototypes loom
    # does not write: components/quantization/float8.py, mx.py).
    quantized_experts: pydantic.StrictBool = True

    @pydantic.model_validator(mode="after")
    def _moe_combinations(self) -> Features:
        """The combinations megatron-core 0.16.1's TransformerConfig refuses
        (transformer_config.py __post_init__)."""
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            raise ValueError("moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor")
        if self.moe_pad_expert_input_to_capacity and self.moe_token_dispatcher == "deepep":
            raise ValueError("moe_pad_expert_input_to_capacity with a dispatcher other than deepep (DeepEP cannot pad)")
        if self.moe_shared_expert_overlap and self.moe_token_dispatcher != "alltoall":
            raise ValueError("moe_shared_expert_overlap with moe_token_dispatcher alltoall (the only one that runs it)")
        if self.overlap_moe_expert_parallel_comm and self.moe_token_dispatcher == "allgather":
            raise ValueError("overlap_moe_expert_parallel_comm with moe_token_dispatcher alltoall, deepep or hybridep")
        if self.moe_shared_expert_overlap and self.overlap_moe_expert_parallel_comm:
            raise ValueError("one of moe_shared_expert_overlap and overlap_moe_expert_parallel_comm, not both")
        return self


Auto = Literal["auto"]


def choices(item: object) -> object:
    """A knob's candidate values: a non-empty list (an empty one leaves nothing to search)."""
    return Annotated[list[item], pydantic.Field(min_length=1)]


class SearchFile(StrictModel):
    """Which values each knob may take; "auto" lets loom choose the candidates."""

    tp: choices(count(MAX_DEGREE)) | Auto = "auto"
    pp: choices(count(MAX_DEGREE)) | Auto = "auto"
    cp: choices(count(MAX_DEGREE)) | Auto = "auto"
    ep: choices(count(MAX_DEGREE)) | Auto = "auto"
    etp: choices(count(MAX_DEGREE)) | Auto = "auto"
    vpp: choices(count(MAX_DEGREE)) | Auto = "auto"
    micro_batch_size: choices(count(MAX_MICRO_BATCH)) | Auto = "auto"
    sequence_parallel: choices(pydantic.StrictBool) | Auto = "auto"
    recompute: choices(Literal["none", "selective", "full"]) | Auto = "auto"
    distributed_optimizer: choices(pydantic.StrictBool) | Auto = "auto"
    zero_stage: choices(Literal[0, 1, 2, 3]) | Auto = "auto"
    # Shard degrees of sharded data parallelism (0: off); "auto": see search/layouts.py.
    fsdp: choices(pydantic.conint(ge=0, le=MAX_DEGREE, strict=True)) | Auto = "auto"
    reshard_after_forward: choices(pydantic.StrictBool) | Auto = "auto"
    # Optimizer on the host ("auto": off; the cheapest fix of a layout that
    # does not fit considers it).
    optimizer_offload: choices(pydantic.StrictBool) | Auto = "auto"
    # MoE: the token dispatchers to try ("auto": features.moe_token_dispatcher
    # only; DeepEP and HybridEP need their library installed).
    moe_token_dispatcher: choices(Dispatcher) | Auto = "auto"


class JobFile(StrictModel):
    model: Annotated[str, pydantic.Field(min_length=1)]  # a catalogue name or a config.json path
    cluster: str | dict
    global_batch_size: count(MAX_GLOBAL_BATCH)
    seq_length: count(MAX_SEQ_LENGTH)
    precision: Precision = "bf16"
    optimizer: Literal["adam"] = "adam"
    framework: Framework = "megatron"
    stack: StackName | None = None  # feature presets of a training stack (stacks.py); default: the framework's
    features: Features = Features()
    search: SearchFile = SearchFile()
    top_k: count(1_000) = 5
    train_iters: count(1_000_000_000) = 1000
    profiles: list[str] = []  # loom profile layers/gemm outputs, relative to this file
    # What every plan leaves free on each GPU: a fraction of capacity or a size ("4 GiB").
    memory_headroom: float | str = DEFAULT_FRACTION

    @pydantic.field_validator("memory_headroom")
    @classmethod
    def _headroom(cls, value: float | str) -> float | str:
        parse_headroom(value)  # raises ValueError with what was expected
        return value


@dataclass(frozen=True, eq=False)
class LayerProfile:
    """A ``kind: layers`` profile (``loom profile layers``) checked against the
    job's model; the cost model resolves it into corrections of its
    estimates (cost/measured.py). Identity is equality, so the resolution
    can be cached per profile."""

    path: str
    document: LayersDocument


@dataclass(frozen=True)
class Job:
    model: ModelSpec
    cluster: Cluster
    global_batch_size: int
    seq_length: int
    precision: str = "bf16"
    optimizer: str = "adam"
    framework: str = "megatron"
    stack: str = DEFAULT_STACK
    features: Features = field(default_factory=Features)
    search: SearchFile = field(default_factory=SearchFile)
    top_k: int = 5
    train_iters: int = 1000
    trial: bool = False  # a short trial run with every report on (planner/output/trial.py)
    source: str = "<job>"
    layer_profile: LayerProfile | None = None  # measured layers in place of estimates
    profiles: tuple[str, ...] = ()  # the profile files applied
    memory_headroom: MemoryHeadroom = DEFAULT_HEADROOM  # what every plan leaves free (headroom.py)
    flags: tuple[tuple[str, str], ...] = ()  # (field, flag) of the fields a command-line flag set

    def blame(self, field_name: str) -> tuple[str, str]:
        """(source, field) to name in an error about ``field_name``: the
        command line's flag where one set it, else the job file's field."""
        flag = dict(self.flags).get(field_name)
        return ("command line", flag) if flag else (self.source, field_name)

    def __post_init__(self) -> None:
        # torchtitan 0.2.2's deepseek_v3 builds no multi-token prediction
        # modules (models/deepseek_v3/model/): the job trains the model without them.
        if self.framework == "torchtitan" and self.model.mtp_layers:
            object.__setattr__(self, "model", replace(self.model, mtp_layers=0))

    @property
    def params_dtype_bytes(self) -> int:
        """Model weights are 16-bit in every supported precision (fp8 keeps
        bf16 weights and casts inside Transformer Engine's GEMMs)."""
        return 2


def _resolve_cluster(value: str | dict, job_path: Path | None, source: str) -> Cluster:
    if isinstance(value, dict):
        return parse_cluster(value, source, prefix="cluster")
    candidates = [Path(value), *([job_path.parent / value] if job_path else []), EXAMPLES_DIR / value]
    for candidate in candidates:
        if candidate.is_file():
            return load_cluster(candidate)
    raise SpecError(source, "cluster", f"a cluster YAML path (absolute, relative to the job file, or a bundled example; "
                    f"{why_missing(*candidates)})", value)


def _resolve_file(value: str, job_path: Path | None) -> Path:
    """A path as given, or relative to the job file."""
    path = Path(value)
    if job_path is not None and not path.is_absolute() and not path.exists() and (job_path.parent / value).exists():
        return job_path.parent / value
    return path


def load_job(path: Path | None = None, overrides: dict | None = None) -> Job:
    """Read ``path`` (the bundled example when None) and apply CLI overrides.
    Raises SpecError; one whose problems all lie in flags names the command
    line, not the job file the user may never have seen."""
    try:
        return _load_job(path, overrides)
    except SpecError as error:
        problems = error.problems
        if path is None and error.source == str(DEFAULT_JOB):
            # No job file given: a field of the bundled example is changed by its flag.
            problems = [(_flag_of(field) if field in (overrides or {}) else field, expected, got) for field, expected, got in problems]
        if all(str(field).startswith("--") for field, _, _ in problems) and error.source == str(path or DEFAULT_JOB):
            raise SpecError.of("command line", problems) from None
        raise


def _flag_of(field: str) -> str:
    """The command-line flag that sets a job file's field."""
    return "--" + ("profile" if field == "profiles" else field.replace("_", "-"))


def _load_job(path: Path | None, overrides: dict | None) -> Job:
    job_path = path or DEFAULT_JOB
    source = str(job_path)
    data = read_mapping(job_path)
    if "model_type" in data and "model" not in data:
        raise SpecError(source, "model_type", "a job file (model, cluster, global_batch_size, seq_length): this is a model's "
                        "config.json, which --model takes", data["model_type"])
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    data.update(given)
    # A value from a flag is blamed on the flag, not on the job file.
    flags = {key: _flag_of(key) for key in given}
    spec = validate(JobFile, data, source, flags=flags)
    resolved = _resolve_file(spec.model, job_path)  # as given where it is not the job file's neighbour ("dir/" keeps its slash)
    model = load_model(spec.model if resolved == Path(spec.model) else str(resolved), source="--model" if "model" in given else source)
    cluster = _resolve_cluster(spec.cluster, job_path, "--cluster" if "cluster" in given else source)
    if spec.precision == "mxfp8":  # fp8 with MXFP8 block scaling
        spec = _as_mxfp8(spec, cluster, source if "precision" not in flags else "command line", flags.get("precision", "precision"))
    stack = spec.stack or FRAMEWORK_STACK[spec.framework]
    if spec.framework not in STACKS[stack].frameworks:
        ours = ", ".join(name for name, preset in STACKS.items() if spec.framework in preset.frameworks)
        raise SpecError("command line" if "stack" in flags else source, flags.get("stack", "stack"), f"a stack {spec.framework} runs ({ours})", stack)
    job = Job(
        model=model,
        cluster=cluster,
        global_batch_size=spec.global_batch_size,
        seq_length=spec.seq_length,
        precision=spec.precision,
        optimizer=spec.optimizer,
        framework=spec.framework,
        stack=stack,
        features=_attention_features(_precision_features(stack_features(stack, spec.features), spec.precision, spec.features, source),
                                     model, spec.features, source),
        search=spec.search,
        top_k=spec.top_k,
        train_iters=spec.train_iters,
        source=source,
        memory_headroom=parse_headroom(spec.memory_headroom),
        flags=tuple(flags.items()),
    )
    try:
        check_job(job)
    except SpecError as error:
        raise SpecError.of(source, [(flags.get(field, field), expected, got) for field, expected, got in error.problems]) from None
    paths = [_resolve_file(value, job_path) for value in spec.profiles]
    for index, (value, path) in enumerate(zip(spec.profiles, paths)):
        if not path.is_file():
            field = flags.get("profiles", f"profiles.{index}")
            raise SpecError("command line" if "profiles" in flags else source, field,
                            f"an existing profile JSON, absolute or relative to the job file ({why_missing(path)})", value)
    return with_profiles(job, paths)


def _attention_features(features: Features, model: ModelSpec, given: Features, source: str) -> Features:
    """ALiBi (BLOOM) and attention soft-capping (Gemma 2) run in FlashAttention-2
    (flash_attn_func's alibi_slopes and softcap) but in neither cuDNN's fused
    attention nor PyTorch's SDPA; transformers runs both eagerly. So such a
    model attends unfused unless the job asks for FlashAttention-2
    (``attention_kernel: flash2``); flash with cuDNN's kernel is bad input."""
    if not (model.alibi or model.attention_softcap):
        return features
    why = "ALiBi" if model.alibi else "attention soft-capping"
    if features.flash_attention and features.attention_kernel == "flash2":
        return features
    if "flash_attention" in given.model_fields_set and given.flash_attention:
        raise SpecError(source, "features.attention_kernel", f"flash2 with flash_attention for {model.name} (its {why} runs in "
                        "FlashAttention-2, not cuDNN's fused attention)", features.attention_kernel)
    return features.model_copy(update={"flash_attention": False})


def _as_mxfp8(spec: JobFile, cluster: Cluster, source: str, field: str) -> JobFile:
    """``precision: mxfp8`` as fp8 with ``fp8_recipe: mxfp8``; what cannot run
    it is blamed on the precision the user gave.

    Raises SpecError: another fp8_recipe given, a GPU without Blackwell's
    block-scaled tensor cores, or a framework with no MXFP8 (DeepSpeed)."""
    if spec.features.fp8_recipe != "mxfp8" and "fp8_recipe" in spec.features.model_fields_set:
        raise SpecError(source, "features.fp8_recipe", "mxfp8 (or unset) with precision mxfp8", spec.features.fp8_recipe)
    old = next((node.gpu.name for node in cluster.nodes if not node.gpu.fp8_gemm_any_layout), None)
    if old:
        raise SpecError(source, field, f"a precision {old} runs (MXFP8 needs Blackwell's block-scaled fp8)", "mxfp8")
    if spec.framework == "deepspeed":
        raise SpecError(source, field, "bf16, fp16, tf32 or fp32 with DeepSpeed (its config has no fp8 switch; use Megatron)", "mxfp8")
    return spec.model_copy(update={"precision": "fp8", "features": spec.features.model_copy(update={"fp8_recipe": "mxfp8"})})


def _precision_features(features: Features, precision: str, given: Features, source: str) -> Features:
    """No flash-attention kernel takes fp32 (FlashAttention and cuDNN's
    fused attention need fp16/bf16: Transformer Engine falls back to its
    unfused attention, torchtitan's SDPA to the math kernel), so fp32 and
    tf32 jobs attend unfused; asking for flash there is bad input."""
    if precision not in FP32_PRECISIONS:
        return features
    if "flash_attention" in given.model_fields_set and given.flash_attention:
        raise SpecError(source, "features.flash_attention", f"false with precision {precision} (flash kernels take fp16/bf16 only)", True)
    return features.model_copy(update={"flash_attention": False})


def stack_features(stack: str, features: Features) -> Features:
    """``features`` over the presets of ``stack``: the fields the job set win."""
    return Features(**{**STACKS[stack].features, **features.model_dump(include=features.model_fields_set)})


def check_job(job: Job) -> None:
    """Checks that need the model and cluster together."""
    moe = job.model.moe
    if moe is not None:
        _check_load_imbalance(job, moe)
        _check_moe_features(job, moe)
    else:
        _check_dense(job)
    why = _why_not(job.model, job.framework)
    if why:
        raise SpecError(job.source, "framework", f"{_frameworks_for(job.model)} for {job.model.name} ({why})", job.framework)
    gpus = {node.gpu.name: node.gpu for node in job.cluster.nodes}.values()
    for gpu in gpus:
        if not gpu.supports(job.precision):
            supported = ", ".join(p for p in ("bf16", "fp16", "fp8", "nvfp4", "tf32", "fp32") if gpu.supports(p))
            raise SpecError(job.source, "precision", f"a precision {gpu.name} supports ({supported})", job.precision)
        if job.precision == "fp8" and job.features.fp8_recipe == "mxfp8" and not gpu.fp8_gemm_any_layout:
            # MXFP8's block scales are a Blackwell tensor-core format (TE's MXFP8BlockScaling needs compute capability 10.0).
            others = "tensorwise" if job.framework == "torchtitan" else "delayed, tensorwise or blockwise"  # torchtitan's float8: _check_torchtitan
            raise SpecError(job.source, "features.fp8_recipe", f"{others} on {gpu.name} (MXFP8 needs Blackwell)", "mxfp8")
        if job.memory_headroom.of(gpu.memory_bytes) >= gpu.memory_bytes:
            raise SpecError(job.source, "memory_headroom", f"less than the {gpu.memory_bytes / 2**30:.2f} GiB a {gpu.name} has",
                            str(job.memory_headroom))
    if job.framework == "torchtitan":
        _check_torchtitan(job)
    elif job.features.cross_entropy_fusion == "torch":
        raise SpecError(job.source, *_from_stack(job, "cross_entropy_fusion", f"none, native or te with {job.framework} (torch is torchtitan's loss)"))
    if job.features.repeat_kv and job.framework != "torchtitan":
        raise SpecError(job.source, *_from_stack(job, "repeat_kv", f"false with {job.framework} (its attention reads grouped K and V; "
                                                                  "repeating them is torchtitan 2024-12's)"))
    if job.features.pipeline_keeps_outputs and job.framework != "torchtitan":
        raise SpecError(job.source, *_from_stack(job, "pipeline_keeps_outputs", f"false with {job.framework} (it is torch.distributed."
                                                                               "pipelining's, which torchtitan runs)"))
    if not job.features.fused_optimizer and job.framework != "torchtitan":
        raise SpecError(job.source, *_from_stack(job, "fused_optimizer", f"true with {job.framework} (loom prices its fused Adam; "
                                                                       "foreach kernels are torchtitan's choice)"))
    if job.features.optimizer_states == "bf16" and job.framework == "deepspeed":
        raise SpecError(job.source, "features.optimizer_states", "fp32 with DeepSpeed (loom writes no bf16 optimizer for it)", "bf16")
    if job.framework == "megatron" and job.precision == "fp32":
        raise SpecError(job.source, "precision", "tf32 with megatron (Transformer Engine runs fp32 GEMMs on TF32 tensor cores: "
                        "transformer_engine/common/gemm/cublaslt_gemm.cu)", "fp32")
    if job.precision in FP32_PRECISIONS and job.features.optimizer_states == "bf16":
        raise SpecError(job.source, "features.optimizer_states", f"fp32 with precision {job.precision}", "bf16")
    if job.precision == "nvfp4" and job.framework != "megatron":
        other = "bf16, fp16, tf32 or fp32" if job.framework == "deepspeed" else "bf16 or fp8"
        raise SpecError(job.source, "precision", f"{other} with {job.framework} (nvfp4 is Transformer Engine's NVFP4BlockScaling, "
                        "through Megatron's --fp4-format)", "nvfp4")
    if job.precision == "nvfp4" and job.features.tp_comm_overlap:
        raise SpecError(job.source, "features.tp_comm_overlap", "false with precision nvfp4 (set it in the job's features: loom "
                        "prices Transformer Engine's userbuffers for bf16 and fp8 only)", True)
    if job.framework == "deepspeed" and job.precision == "fp8":
        raise SpecError(job.source, "precision", "bf16, fp16, tf32 or fp32 with DeepSpeed (its config has no fp8 switch; use Megatron)", "fp8")
    if job.seq_length > job.model.max_position_embeddings and job.model.learned_position_embeddings:
        raise SpecError(
            job.source, "seq_length", f"at most {job.model.max_position_embeddings} (learned position embeddings)", job.seq_length
        )


def _from_stack(job: Job, feature: str, expected: str) -> tuple[str, str, object]:
    """(field, expected, got) for a feature the framework cannot run: blamed
    on the stack when the stack set it (a stack of another framework)."""
    value = getattr(job.features, feature)
    if STACKS[job.stack].features.get(feature) == value:
        return "stack", f"a stack of {job.framework}'s ({expected.split(' with ')[0]} for {feature})", job.stack
    return f"features.{feature}", expected, value


def _why_not(model: ModelSpec, framework: str) -> str:
    """Why ``framework`` cannot train ``model`` ('' when it can)."""
    moe = model.moe
    if framework == "deepspeed" and moe is not None and (moe.top_k > 2 or moe.shared_ffn_hidden_size or model.mla):
        # deepspeed/moe/sharded_moe.py: loom prices top1gating and top2gating;
        # topkgating (k > 2) renormalises the chosen experts' gates whatever the
        # model does and dispatches through dense [tokens, experts, capacity]
        # one-hot masks, which loom does not price; no shared experts or MLA.
        return "loom's DeepSpeed MoE pricing, which covers top-1 and top-2 gates without shared experts or MLA"
    if framework == "megatron" and model.yarn is not None:
        return ("its config scales RoPE by YaRN, which Megatron-LM core_v0.16.1 writes for multi-latent attention only: "
                "--position-embedding-type has no yarn")
    if framework == "megatron" and model.megatron_unbuildable:
        return f"Megatron-LM cannot build {model.megatron_unbuildable}; DeepSpeed runs your own model code"
    if framework == "torchtitan" and (why := torchtitan.trainable(model)):
        return f"torchtitan needs {why}"
    return ""


def _frameworks_for(model: ModelSpec) -> str:
    """The frameworks that can train ``model``, as an error message offers them."""
    able = [name for name in get_args(Framework) if not _why_not(model, name)]
    return " or ".join(able) if able else "none of loom's frameworks: Megatron-LM, DeepSpeed and torchtitan each refuse it"


def _check_torchtitan(job: Job) -> None:
    """What torchtitan 0.2.2 can train: its registered models
    (specs/torchtitan.py), in bf16 or float8 through torchao (tensorwise
    scaling, or MXFP8 on Blackwell: its quantize.linear.float8 and
    quantize.linear.mx converters; no fp16 in Training.mixed_precision_param)."""
    if job.precision == "fp16":
        raise SpecError(job.source, "precision", "bf16, fp8, tf32 or fp32 with torchtitan (its mixed precision is bfloat16 or float32)",
                        job.precision)
    if job.features.cross_entropy_fusion != "torch":
        raise SpecError(job.source, *_from_stack(job, "cross_entropy_fusion", "torch with torchtitan (PyTorch's cross_entropy on fp32 logits)"))
    if job.model.moe is not None and job.precision in FP32_PRECISIONS:
        raise SpecError(job.source, "precision", "bf16 or fp8 for torchtitan's MoE models (its grouped expert GEMMs cast to bf16 "
                        "whatever the training dtype: models/moe/moe.py _run_experts_grouped_mm)", job.precision)
    if job.precision == "fp8" and job.features.fp8_recipe not in ("tensorwise", "mxfp8"):
        raise SpecError(job.source, "features.fp8_recipe", "tensorwise (or mxfp8 on Blackwell) with torchtitan (torchao's float8 and MX training)",
                        job.features.fp8_recipe)
    for feature in ("overlap_grad_reduce", "overlap_param_gather"):
        if not getattr(job.features, feature):
            raise SpecError(job.source, *_from_stack(job, feature, "true with torchtitan (FSDP2 and its DDP always overlap "
                                                                   "their collectives with compute)"))
    flavor = torchtitan.flavor_of(job.model)
    if job.features.tp_comm_overlap and flavor is not None and flavor.name == "gpt_oss":
        raise SpecError(job.source, "features.tp_comm_overlap", "false for torchtitan's gpt_oss (its parallelize_fn applies TP with "
                        "enable_async_tp=False: models/gpt_oss/infra/parallelize.py)", True)
    if job.model.moe is None:
        return
    for feature in ("moe_router_fusion", "moe_permute_fusion"):
        if getattr(job.features, feature):
            raise SpecError(job.source, *_from_stack(job, feature, "false with torchtitan (Megatron's fused MoE kernels)"))
    if job.features.moe_token_dispatcher not in torchtitan.DISPATCHERS:
        raise SpecError(job.source, *_from_stack(job, "moe_token_dispatcher", f"{' or '.join(torchtitan.DISPATCHERS)} with torchtitan "
                                                                              "(its expert_parallel_comm_backend: standard | deepep)"))
    for feature in ("overlap_moe_expert_parallel_comm", "moe_shared_expert_overlap"):
        if getattr(job.features, feature):
            raise SpecError(job.source, *_from_stack(job, feature, "false with torchtitan (Megatron's MoE overlap)"))
    if job.features.quantized_experts and job.precision in ("fp8", "nvfp4"):
        raise SpecError(job.source, *_from_stack(job, "quantized_experts", "false with torchtitan (loom writes its float8 or mx "
                                                                         "converter for nn.Linear only; the experts stay in bf16)"))
    if job.features.moe_token_dispatcher == "deepep" and flavor is not None and flavor.name != "deepseek_v3":
        raise SpecError(job.source, *_from_stack(job, "moe_token_dispatcher", f"alltoall for torchtitan's {flavor.name} (only its "
                                                                              "deepseek_v3 reads expert_parallel_comm_backend)"))


# The features that only an MoE model's layers read.
MOE_FEATURES = ("moe_load_imbalance", "moe_token_dispatcher", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
                "moe_router_fusion", "moe_permute_fusion", "overlap_moe_expert_parallel_comm", "moe_shared_expert_overlap",
                "quantized_experts")


# The MoE features only Megatron runs; what DeepSpeed's and torchtitan's MoE
# layers run is their default (features.py defaults).
MEGATRON_MOE_FEATURES = ("moe_token_dispatcher", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_router_fusion",
                         "moe_permute_fusion", "overlap_moe_expert_parallel_comm", "moe_shared_expert_overlap")


def _check_moe_features(job: Job, moe: MoE) -> None:
    """An MoE job's features against what its framework and model run:
    DeepSpeed runs none of Megatron's MoE features (loom writes its MoE layer
    dropless: moe_snippet.py); torchtitan 0.2.2's MoE is dropless
    (models/moe/moe.py); megatron-core 0.16.1 (transformer_config.py
    __post_init__) runs the A2A overlap only on a bf16 or fp16 model and with
    at most one MTP layer, needs a pre-softmax router at top-1 ('Please use
    --moe-router-pre-softmax when topk is 1', where transformers' Mixtral
    renormalises the one weight to 1), and the shared-expert overlap needs
    shared experts to run."""
    features = job.features
    if job.framework == "deepspeed":
        for feature in MEGATRON_MOE_FEATURES:
            default = Features.model_fields[feature].default
            if getattr(features, feature) != default:
                raise SpecError(job.source, f"features.{feature}", f"{_shown(default)} with deepspeed (Megatron's MoE feature; loom writes "
                                "DeepSpeed's MoE layer dropless, on its all-to-all)", getattr(features, feature))
        return
    if job.framework == "torchtitan":
        for feature in ("moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity"):
            if getattr(features, feature):
                raise SpecError(job.source, f"features.{feature}", "unset with torchtitan (its MoE is dropless)", getattr(features, feature))
        return
    if not features.quantized_experts:
        raise SpecError(job.source, *_from_stack(job, "quantized_experts", f"true with {job.framework} (Transformer Engine's "
                                                                         "GroupedLinear runs the experts at the job's precision)"))
    if features.overlap_moe_expert_parallel_comm:
        if job.precision in FP32_PRECISIONS:
            raise SpecError(job.source, "features.overlap_moe_expert_parallel_comm", f"false with precision {job.precision} "
                            "(megatron-core runs it on bf16 or fp16 models only)", True)
        if job.model.mtp_layers > 1:
            raise SpecError(job.source, "features.overlap_moe_expert_parallel_comm", f"false with {job.model.mtp_layers} multi-token "
                            "prediction layers (megatron-core runs it with at most one)", True)
    if features.moe_shared_expert_overlap and not moe.shared_ffn_hidden_size:
        raise SpecError(job.source, "features.moe_shared_expert_overlap", f"false for {job.model.name} (no shared experts to overlap)", True)
    if moe.top_k == 1 and not moe.pre_softmax:
        raise SpecError(job.source, "model", f"top-k of at least 2 for {job.model.name} with Megatron (at top-1 megatron-core needs a "
                        "pre-softmax router, which weights the expert by its probability where this model renormalises it to 1)",
                        f"num_experts_per_tok {moe.top_k}")


def _shown(default: object) -> str:
    """A feature's default as a job file writes it: unset, false, true, 1."""
    return f"{default:g}" if isinstance(default, float) else {None: "unset", False: "false", True: "true"}.get(default, str(default))


def _check_dense(job: Job) -> None:
    """A dense model's job sets no MoE feature its stack did not (it would
    be ignored, where the user meant something by it), nor searches
    dispatchers."""
    preset = STACKS[job.stack].features
    for feature in MOE_FEATURES:
        value, default = getattr(job.features, feature), Features.model_fields[feature].default
        if value != preset.get(feature, default) and value != default:
            shown = _shown(default)
            raise SpecError(job.source, f"features.{feature}", f"{shown}, the default, for {job.model.name} (a dense model: no experts)",
                            dict(value) if isinstance(value, tuple) else value)
    if job.search.moe_token_dispatcher != "auto":
        raise SpecError(job.source, "search.moe_token_dispatcher", f"auto for {job.model.name} (a dense model: no tokens to dispatch)",
                        job.search.moe_token_dispatcher)


def _check_load_imbalance(job: Job, moe: MoE) -> None:
    """A busiest/mean ratio routing can reach (MoE.most_imbalance), at EP
    sizes that divide the experts."""
    value = job.features.moe_load_imbalance
    pairs = value if isinstance(value, tuple) else ((moe.num_experts, value),)
    for ep, ratio in pairs:
        if moe.num_experts % ep:
            raise SpecError(job.source, "features.moe_load_imbalance", f"EP sizes that divide {job.model.name}'s {moe.num_experts} experts",
                            ep)
        most = moe.most_imbalance(ep)
        if ratio > most:
            where = f"at EP {ep}" if isinstance(value, tuple) else "at any EP"
            raise SpecError(job.source, "features.moe_load_imbalance", f"at most {most:g} {where} for {job.model.name} (a rank receives "
                            f"at most min(top_k, its experts) of each token's {moe.top_k} copies)", ratio)


def job_warnings(job: Job) -> list[str]:
    """What is legal but probably not meant: a batch that looks like tokens,
    a sequence longer than the model was trained on, an MoE model of the
    kind loom prices optimistically, a torchtitan flavor whose rotary
    embeddings or norm epsilon are not the config's, nodes that differ but
    have no names to tell them apart by."""
    warnings = []
    tokens = job.global_batch_size * job.seq_length
    if tokens > TOKENS_PER_STEP_WARNING:
        warnings.append(f"global_batch_size counts sequences: {job.global_batch_size:,} sequences of {job.seq_length:,} tokens is "
                        f"{tokens / 1e9:.1f}B tokens per step (published runs use up to ~0.02B); did you give it in tokens?")
    if job.seq_length > job.model.max_position_embeddings and job.model.rotary:
        warnings.append(f"seq_length {job.seq_length:,} is longer than {job.model.name}'s max_position_embeddings "
                        f"{job.model.max_position_embeddings:,}: the launch files raise it to the sequence length (rotary "
                        "positions extrapolate; quality is not loom's to judge)")
    if job.precision == "nvfp4":
        ignored = " (fp8_param_gather is fp8's: ignored)" if job.features.fp8_param_gather else ""
        warnings.append("nvfp4 GEMMs are priced at fp8's large-GEMM efficiency on the fp4 peak, an assumption no published figure "
                        f"checks yet: expect nvfp4 step times to be optimistic{ignored}")
    moe = job.model.moe
    if moe is not None and not moe.shared_ffn_hidden_size and job.framework == "megatron":
        warnings.append(f"{job.model.name} routes to experts only (no shared expert): loom prices such models faster than most "
                        "measured Megatron runs of Qwen3-MoE, gpt-oss and Mixtral it is checked against, where it is right for "
                        "DeepSeek-V3 (benchmarks/moe_runs.py); treat this step time as optimistic")
    if job.framework == "torchtitan":
        warnings += [text for text in (torchtitan.rotary_mismatch(job.model, job.seq_length), torchtitan.norm_mismatch(job.model)) if text]
    if not job.cluster.named_hosts and not job.cluster.uniform:
        warnings.append(f"cluster {job.cluster.name}'s nodes differ (overrides, leaves or links) but it names no hosts: the launch "
                        "files take the i-th node the job is given as its node i; give hosts: to pin them")
    for path in job.profiles:
        if read_json(Path(path), "profile JSON").get("device") == "cpu":
            warnings.append(f"profile {path} was measured on a CPU (device: cpu): its times are not a GPU's")
    if job.cluster.fabric.links_profile is not None:
        links = load_links_profile(job.cluster.fabric.links_profile)
        if links.backend != "nccl" or links.device == "cpu":
            warnings.append(f"links profile {job.cluster.fabric.links_profile} was measured with {links.backend} on {links.device}: "
                            f"its bandwidths are not those NCCL reaches between {job.cluster.gpu_summary} GPUs")
    return warnings


def with_profiles(job: Job, paths: list[Path]) -> Job:
    """``job`` with its profiles applied: a gemm profile recalibrates the GEMM
    curve of the cluster's GPUs of its type; a calibration (loom calibrate)
    its kernel rates, links and memory overhead (``calibrated_cluster``); a
    layers profile (one at most, of the job's model) rides on the job for the
    time and memory models."""
    layer_profile, cluster = None, job.cluster
    for path in paths:
        data = read_json(path, "profile JSON (loom profile layers or gemm, or loom calibrate)")
        if isinstance(data, dict) and data.get("kind") == "calibration":
            cluster = calibrated_cluster(job, cluster, read_calibration(path), str(path))
            continue
        document = read_profile(path)
        gpu = find_gpu(document.gpu, str(path), "gpu")
        types = sorted({node.gpu.name for node in cluster.nodes})
        if gpu.name not in types:
            raise SpecError(str(path), "gpu", f"a GPU type of cluster {cluster.name} ({', '.join(types)})", document.gpu)
        if isinstance(document, GemmDocument):
            fit = document.fit
            calibrated: dict[int, GPU] = {}  # one object per GPU kind (a power cap is kept), so identity stays equality
            for node in cluster.nodes:
                if node.gpu.name == gpu.name and id(node.gpu) not in calibrated:
                    calibrated[id(node.gpu)] = replace(node.gpu, gemm_efficiency={**gpu.gemm_efficiency, document.dtype: fit.gemm_efficiency},
                                                       gemm_k_overhead=fit.k_overhead, gemm_profile=str(path))
            cluster = replace(cluster, nodes=tuple(replace(node, gpu=calibrated.get(id(node.gpu), node.gpu)) for node in cluster.nodes))
            continue
        if layer_profile is not None:
            raise SpecError(str(path), "kind", f"one layers profile per job ({layer_profile.path} is one already)", "layers")
        _check_model(document, job.model, str(path))
        layer_profile = LayerProfile(str(path), document)
    return replace(job, cluster=cluster, layer_profile=layer_profile, profiles=tuple(str(path) for path in paths))


def calibrated_cluster(job: Job, cluster: Cluster, document: CalibrationDocument, source: str) -> Cluster:
    """``cluster`` with a calibration applied (profiles/calibration.py says
    what each factor multiplies and where it holds): its GPUs of the
    calibration's type run their kernels at the learnt rates and, for a job
    of the same framework, hold the learnt memory overhead; on the cluster
    the runs ran on, its links reach the learnt collective efficiency.

    Raises SpecError naming ``source`` when the cluster has no GPU of the
    calibration's type, or its precision or framework is none loom knows."""
    for name, known in (("precision", get_args(Precision)), ("framework", get_args(Framework))):
        if getattr(document, name) not in known:
            raise SpecError(source, name, f"one of {', '.join(known)}", getattr(document, name))
    gpu = find_gpu(document.gpu, source, "gpu")
    types = sorted({node.gpu.name for node in cluster.nodes})
    if gpu.name not in types:
        raise SpecError(source, "gpu", f"a GPU type of cluster {cluster.name} ({', '.join(types)})", document.gpu)
    earlier = next((node.gpu.calibration for node in cluster.nodes if node.gpu.name == gpu.name and node.gpu.calibration), None)
    if earlier:
        raise SpecError(source, "gpu", f"one calibration per GPU type ({earlier.split(':')[0]} calibrates {gpu.name} already)", document.gpu)

    def rate(factor, value: float | None) -> float | None:
        return value if factor is None or value is None else min(1.0, value * factor.value)

    calibrated: dict[int, GPU] = {}  # one object per GPU kind, so identity stays equality
    same_cluster = document.cluster == cluster.name
    same_framework = document.framework == job.framework
    # The GEMM factor holds at the runs' precision only (it scales that precision's gemm_efficiency).
    learnt = [f"{kind} x{factor.value:.3f}" for kind in ("gemm", "attention", "elementwise") if (factor := getattr(document, kind))
              and (kind != "gemm" or document.precision == job.precision)]
    learnt += [f"{kind} links x{factor.value:.3f}" for kind in ("nvlink", "network") if (factor := getattr(document, kind)) and same_cluster]
    if same_framework and document.memory_overhead_bytes:
        learnt.append(f"memory +{document.memory_overhead_bytes / GiB:.2f} GiB")
    summary = f"{source}: {', '.join(learnt) or 'nothing that applies'} (from {len(document.runs)} run{'s' * (len(document.runs) > 1)})"
    nodes = []
    for node in cluster.nodes:
        if node.gpu.name != gpu.name:
            nodes.append(node)
            continue
        if id(node.gpu) not in calibrated:
            old = node.gpu
            efficiency = dict(old.gemm_efficiency)
            efficiency[document.precision] = rate(document.gemm, efficiency.get(document.precision))
            calibrated[id(old)] = replace(
                old, gemm_efficiency=efficiency, attention_efficiency=rate(document.attention, old.attention_efficiency),
                flash2_attention_efficiency=rate(document.attention, old.flash2_attention_efficiency),
                hbm_efficiency_factor=document.elementwise.value if document.elementwise else 1.0,
                memory_overhead_bytes=document.memory_overhead_bytes if same_framework else 0.0, calibration=summary)
        links = {}
        if same_cluster and document.nvlink:
            links["nvlink_efficiency"] = rate(document.nvlink, node.nvlink_efficiency)
        if same_cluster and document.network:
            links["nic_efficiency"] = rate(document.network, node.nic_efficiency)
        nodes.append(replace(node, gpu=calibrated[id(node.gpu)], **links))
    return replace(cluster, nodes=tuple(nodes))


def _check_model(document: LayersDocument, model: ModelSpec, source: str) -> None:
    """A layers profile must be of a model with the job's layer dimensions."""
    wanted = ModelDims.of(model).model_dump()
    for name, got in document.model.model_dump().items():
        if name != "name" and got != wanted[name]:
            raise SpecError(source, f"model.{name}", f"{wanted[name]} ({model.name}'s; profile that model's layers)", got)
