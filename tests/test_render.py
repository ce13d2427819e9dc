"""Tables a person reads: at 80 columns every figure is printed whole; a
long layout label wraps instead."""

from __future__ import annotations

import io

from rich.console import Console

from loom.cli.render import breakdown_table, plans_table
from loom.planner.plan import evaluate
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model

from conftest import make_cluster


def test_figures_stay_whole_when_the_layout_label_is_long():
    job = Job(model=load_model("deepseek-v3"), cluster=make_cluster(128), global_batch_size=4096, seq_length=4096)
    long_label = Layout(tp=1, pp=16, vpp=2, dp=32, cp=2, ep=8, micro_batch_size=2, global_batch_size=4096, distributed_optimizer=True,
                        recompute="selective", recompute_modules=("mlp", "moe", "moe_act", "layernorm", "mla_up_proj"))
    plans = [evaluate(job, long_label), evaluate(job, Layout(tp=2, pp=16, dp=16, cp=2, ep=8, micro_batch_size=1, global_batch_size=4096,
                                                             sequence_parallel=True, distributed_optimizer=True))]
    out = io.StringIO()
    console = Console(file=out, width=80)
    console.print(plans_table(plans, "deepseek-v3"))
    console.print(breakdown_table(plans[0]))
    text = out.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "…" not in text
    for plan in plans:
        assert f"{plan.step_time_s:.3f}" in text and f"{plan.mfu:.1%}" in text and f"{plan.peak_memory.peak_bytes / 2**30:.1f}" in text
    for seconds in plans[0].step.breakdown_s.values():
        if seconds > 0:
            assert f"{seconds:.3f}" in text
