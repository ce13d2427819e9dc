"""``loom profile layers`` (time each layer kind and count what it keeps for
backward) and ``loom profile gemm`` (time a model's GEMMs and fit the
efficiency curve). Both need torch, imported only when they run; both write
their profile JSON atomically."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer
from rich.markup import escape
from rich.progress import Progress

from loom.cli.common import check_output, err, run
from loom.cli.render import figure, titled_table, whole_figures
from loom.planner.output.files import write_text_file
from loom.planner.specs.errors import SpecError
from loom.planner.specs.model import load_model
from loom.profiles.catalogue import GPU, find_gpu, gpu_names
from loom.profiles.layer_profile import Dtype, GemmDocument, LayersDocument, ModelDims, document_json

MiB = 2**20
DTYPES = get_args(Dtype)  # the precisions a profile may hold

ModelArg = Annotated[str, typer.Argument(help="Catalogue name or config.json path.", show_default=False)]
OutOpt = Annotated[Path, typer.Option("--out", help="Profile JSON to write.")]
TpOpt = Annotated[str, typer.Option("--tp", help="Tensor-parallel sizes, comma-separated: layers are built at one rank's shapes.")]
DtypeOpt = Annotated[str, typer.Option(help="bf16 | fp16")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available) | cuda | cpu")]
GpuOpt = Annotated[Optional[str], typer.Option(help="Catalogue GPU the numbers stand for (detected on CUDA; required on CPU).", show_default=False)]
# More timed runs than this move no median a profile records; the bound keeps
# a typo (--repeats 100000) from running for hours.
MAX_REPEATS = 1000
RepeatsOpt = Annotated[int, typer.Option(min=1, max=MAX_REPEATS, help="Timed runs per measurement (median and spread are kept).")]
WarmupOpt = Annotated[int, typer.Option(min=0, max=MAX_REPEATS, help="Untimed runs first.")]


def layers(
    model: ModelArg,
    out: OutOpt,
    tp: TpOpt = "1",
    micro_batch_size: Annotated[str, typer.Option(help="Micro batch sizes, comma-separated.")] = "1",
    seq_length: Annotated[str, typer.Option(help="Sequence lengths, comma-separated.")] = "2048",
    ep: Annotated[str, typer.Option(help="Expert-parallel sizes for MoE layers, comma-separated.")] = "1",
    kinds: Annotated[str, typer.Option(help="Layer kinds: dense, moe, embedding, head.")] = "dense,moe,embedding,head",
    sequence_parallel: Annotated[bool, typer.Option("--sequence-parallel/--no-sequence-parallel", help="With tp > 1.")] = True,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "auto",
    gpu: GpuOpt = None,
    repeats: RepeatsOpt = 10,
    warmup: WarmupOpt = 2,
) -> None:
    """Time each layer kind forward and backward and count the bytes it keeps for backward."""

    def action() -> None:
        check_output(out, folder=False)
        spec = load_model(model)
        layer_profiler = _torch_module("layers")
        from loom.profiles.torch_blocks import KINDS

        grid = layer_profiler.Grid(
            tp=_ints(tp, "--tp"), micro_batch_size=_ints(micro_batch_size, "--micro-batch-size"),
            seq_length=_ints(seq_length, "--seq-length"), ep=_ints(ep, "--ep"),
            kinds=_choices(kinds, "--kinds", KINDS), sequence_parallel=sequence_parallel,
        )
        torch_device, gpu_entry = _device_and_gpu(device, gpu, _dtype(dtype))
        points = list(layer_profiler.rank_shapes(spec, grid))
        layer_profiler.check_memory(points, torch_device)
        entries = []
        with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task(f"profiling {spec.name} layers on {torch_device}", total=len(points))
            for kind, shape in points:
                entries.append(layer_profiler.measure(kind, shape, dtype, torch_device, repeats, warmup, gpu_entry))
                bar.advance(task)
        document = LayersDocument(
            schema_version=1, kind="layers", model=ModelDims.of(spec), entries=entries, **_measured(gpu_entry, torch_device, dtype, repeats, warmup)
        )
        write_text_file(out, document_json(document), "--out")
        table = titled_table(f"{spec.name} on {document.device}", f"loom: the time model on {gpu_entry.name} and the memory estimator, for comparison")
        for column in ("kind", "tp", "mbs", "seq", "fwd ms", "loom", "bwd ms", "loom", "saved MiB", "loom"):
            table.add_column(column, justify="left" if column == "kind" else "right", no_wrap=True)
        for e in entries:
            table.add_row(e.kind, str(e.tp), str(e.micro_batch_size), str(e.seq_length),
                          *map(figure, (e.forward.median_s * 1e3, e.estimated_forward_s * 1e3, e.backward.median_s * 1e3, e.estimated_backward_s * 1e3,
                                        e.saved_bytes["none"] / MiB, e.estimated_saved_bytes["none"] / MiB)))
        err.print(whole_figures(table))
        err.print(f"wrote {escape(str(out))}: {len(entries)} layer shapes")

    run(action)


def gemm(
    model: ModelArg,
    out: OutOpt,
    tp: TpOpt = "1",
    tokens: Annotated[str, typer.Option(help="GEMM rows (micro batch x sequence per rank), comma-separated.")] = "4096",
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "auto",
    gpu: GpuOpt = None,
    repeats: RepeatsOpt = 10,
    warmup: WarmupOpt = 2,
) -> None:
    """Time the GEMMs of a model's layers and fit the time model's GEMM efficiency curve to them."""

    def action() -> None:
        check_output(out, folder=False)
        spec = load_model(model)
        gemm_profiler = _torch_module("gemm")
        torch_device, gpu_entry = _device_and_gpu(device, gpu, _dtype(dtype))
        tps, token_counts = _ints(tp, "--tp"), _ints(tokens, "--tokens")
        shapes = gemm_profiler.model_gemms(spec, tps, token_counts)
        gemm_profiler.check_memory(spec, tps, token_counts, dtype, torch_device)
        points = []
        with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task(f"timing {len(shapes)} GEMMs on {torch_device}", total=len(shapes))
            for m, n, k in shapes:
                points.append(gemm_profiler.measure_gemm(m, n, k, dtype, torch_device, repeats, warmup))
                bar.advance(task)
        fit = gemm_profiler.fit_curve(points, gpu_entry, dtype)
        document = GemmDocument(schema_version=1, kind="gemm", points=points, fit=fit, **_measured(gpu_entry, torch_device, dtype, repeats, warmup))
        write_text_file(out, document_json(document), "--out")
        best = max(point.tflops for point in points)
        err.print(f"wrote {escape(str(out))}: {len(points)} GEMMs, best {best:.3g} TFLOP/s; fitted gemm_efficiency "
                  f"{fit.gemm_efficiency:.3g} of {gpu_entry.name}'s {fit.peak_tflops:g} TFLOP/s, k_overhead {fit.k_overhead:g} "
                  f"(rms log error {fit.rms_log_error:.3f})")

    run(action)


def _torch_module(name: str):
    """loom.profiles.layers or .gemm, which import torch."""
    try:
        return importlib.import_module(f"loom.profiles.{name}")
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise SpecError("loom profile", "torch", "PyTorch installed (pip install torch, or loom-planner[profile])") from None


def _device_and_gpu(device: str, gpu: str | None, dtype: str):
    """The torch device to run on and the catalogue GPU the numbers stand for."""
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise SpecError("--device", "device", "auto, cuda or cpu", device)
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device", "device", "cpu or auto (torch sees no CUDA device)", device)
    torch_device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    entry = find_gpu(gpu, "--gpu", "gpu") if gpu else _detected_gpu(torch_device)
    if not entry.supports(dtype):
        raise SpecError("--dtype", "dtype", f"a precision {entry.name} supports", dtype)
    return torch_device, entry


def _detected_gpu(device) -> GPU:
    import torch

    if device.type != "cuda":
        raise SpecError("--gpu", "gpu", f"the catalogue GPU these CPU numbers stand for ({', '.join(gpu_names())})")
    name = torch.cuda.get_device_name(device)
    for word in [name, *name.split()]:
        try:
            return find_gpu(word)
        except SpecError:
            continue
    raise SpecError("--gpu", "gpu", f"the catalogue name of {name} ({', '.join(gpu_names())})")


def _measured(gpu: GPU, device, dtype: str, repeats: int, warmup: int) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(gpu=gpu.name, device=name, dtype=dtype, torch_version=torch.__version__, repeats=repeats, warmup=warmup)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise SpecError(option, option.lstrip("-").replace("-", "_"), "positive integers, comma-separated (e.g. 1,2,4)", text)
    return values


def _dtype(text: str) -> str:
    """The one precision --dtype names."""
    if text not in DTYPES:
        raise SpecError("--dtype", "dtype", f"one of {', '.join(DTYPES)}", text)
    return text


def _choices(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(","))
    for value in values:
        if value not in allowed:
            raise SpecError(option, option.lstrip("-").replace("-", "_"), f"one of {', '.join(allowed)}", value)
    return values
