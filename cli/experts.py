"""``loom experts``: place the routed experts of an MoE model on its EP ranks
(replicas included), print per-GPU load and traffic for contiguous, greedy
(EPLB) and loom, and write the expert map and SGLang's expert-location file."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from loom.cli.common import check_output, err, run
from loom.cli.render import short_count, titled_table, whole_figures

# solvers/experts.py's CROSS_NODE_COST and CROSS_GPU_COST (and why), repeated
# here so that loading the CLI does not load CP-SAT; tests/test_experts.py checks they agree.
CROSS_NODE_COST = 1.0
CROSS_GPU_COST = 0.1
# How far past --time-limit the command may run: the solver's steps between
# looks at the clock, and printing and writing the result (each a few tenths
# of a second at most within planner/search/experts.py's size bounds).
TIME_LIMIT_MARGIN_S = 1.0


def experts(
    loads: Annotated[Path, typer.Argument(help="Routed tokens per layer and expert: .npy or .json (layers x experts).", show_default=False)],
    slots_per_gpu: Annotated[int, typer.Option(help="Expert slots per GPU, redundant ones included (slots x EP >= experts).")],
    ep_size: Annotated[Optional[int], typer.Option(help="EP ranks (GPUs). Default with --cluster: all its GPUs.", show_default=False)] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(help="EP ranks per node (default: all on one node).", show_default=False)] = None,
    cluster: Annotated[Optional[Path], typer.Option(help="Cluster YAML: the first --ep-size GPUs, priced on its links.", show_default=False)] = None,
    trace: Annotated[Optional[Path], typer.Option(help="Top-k routing trace, .npy or .json (tokens x layers x top_k expert ids): inter-layer affinity.", show_default=False)] = None,
    time_limit: Annotated[float, typer.Option(help="Wall-clock bound on the whole command (s): reading the inputs, the baselines "
                                              "and the solver, which stops at the limit with its best placement so far "
                                              f"(printing and writing it may take up to {TIME_LIMIT_MARGIN_S:g} s more).")] = 30.0,
    cross_node_cost: Annotated[float, typer.Option(help="A token crossing nodes, in tokens of expert compute.")] = CROSS_NODE_COST,
    cross_gpu_cost: Annotated[float, typer.Option(help="A token crossing GPUs inside a node, same units.")] = CROSS_GPU_COST,
    dense_layers: Annotated[int, typer.Option(help="Leading dense layers SGLang's map needs rows for (DeepSeek-V3: 3).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Write expert_map.json and expert_location.json (SGLang) here.", show_default=False)] = None,
) -> None:
    """Place experts and their replicas on EP ranks: balance the busiest GPU, cut cross-node traffic."""

    def action() -> None:
        deadline_s = time.monotonic() + time_limit  # check_run_flags rejects a bad limit; imports and inputs count against it
        from loom.planner.output.files import write_file_set
        from loom.planner.search.experts import check_run_flags, expert_map, expert_problem, imbalance_by_ep_size, output_files, sglang_location
        from loom.solvers import experts as solver

        check_run_flags(time_limit, dense_layers)
        check_output(out)
        problem = expert_problem(loads, slots_per_gpu, ep_size, gpus_per_node, cluster, trace, cross_node_cost, cross_gpu_cost)
        methods = {"contiguous": solver.evaluate(problem, solver.contiguous_slots(problem))}
        greedy_rows = problem.greedy_rows
        evaluating_s = time.monotonic()
        methods["greedy"] = solver.evaluate(problem, greedy_rows)
        # The solver ends by evaluating its placement once: about as long as greedy's took.
        evaluation_s = time.monotonic() - evaluating_s
        with err.status("placing experts") if err.is_terminal else nullcontext():
            solution = solver.solve(problem, max(deadline_s - time.monotonic() - evaluation_s, 0.0))
        methods["loom"] = solution.figures
        Console().print(_table(problem, methods, trace is not None))
        by_ep = ", ".join(f"{ep}: {ratio:.4g}" for ep, ratio in imbalance_by_ep_size(problem.load_tokens).items())
        if by_ep:  # one expert: no EP size above 1 to spread it over
            Console().print(f"for loom plan: busiest/mean rank load per EP size\n(Megatron's contiguous experts, no replicas)\n"
                            f"features: {{moe_load_imbalance: {{{by_ep}}}}}", markup=False, soft_wrap=True)
        cut_short = f"; {solution.cut_short}" if solution.cut_short else ""
        err.print(f"loom: {solution.method}, {solution.status}, objective {solution.objective:,.1f}, bound {solution.bound:,.1f}, "
                  f"gap {solution.gap:.1%}, {solution.wall_time_s:.1f} s{cut_short}")
        if out is not None:
            document = expert_map(problem, solution, methods, time_limit, dense_layers)
            write_file_set(out, output_files(document, sglang_location(problem, solution.expert_of_slot, dense_layers)))
            err.print(f"wrote expert_map.json and expert_location.json (SGLang --init-expert-location) to {escape(str(out))}")

    run(action)


def _table(problem, methods: dict, traced: bool):
    """Per-GPU load (routed tokens, per layer on average) and traffic of each method."""
    table = titled_table(f"{problem.experts} experts x {problem.layers} layers on {problem.gpus} GPUs, "
                         f"{problem.slots_per_gpu} slots each ({problem.slots - problem.experts} redundant)")
    table.add_column("method", no_wrap=True)
    for column in ("max\nload", "mean\nload", "max/\nmean", "cross-\nnode", "cross-\nGPU", "objective"):
        table.add_column(column, justify="right")
    for name, figures in methods.items():
        crossing = (short_count(figures.cross_node_tokens), short_count(figures.cross_gpu_tokens)) if traced else ("-", "-")
        table.add_row(name, f"{figures.max_load_tokens / problem.layers:,.1f}", f"{figures.mean_load_tokens / problem.layers:,.1f}",
                      f"{figures.imbalance:.3f}", *crossing, short_count(figures.objective))
    table.caption = "load: routed tokens on a GPU per layer (busiest, mean); cross-node/-GPU: routed tokens over all layer pairs (needs --trace)"
    return whole_figures(table)
