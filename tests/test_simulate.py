"""The schedule simulator: closed forms on uniform stages, the published ZB-H1
reduction, Megatron's op orders, and consistent events on uneven stages."""

from __future__ import annotations

import random
from dataclasses import replace
from collections import Counter
from types import SimpleNamespace

import pytest

from loom.planner.schedule.simulate import (
    COMPUTE_KINDS,
    SCHEDULES,
    ChunkCost,
    PipelineCosts,
    _execute,
    interleaved_order,
    one_f_one_b_order,
    SETTLE_FROM,
    simulate,
    simulate_long,
    stage_order,
    zb_h1_order,
)

F, B = 1.0, 2.0  # per-chunk forward and backward seconds of the uniform cases


def uniform(
    pp: int, m: int, vpp: int = 1, forward_s: float = F, backward_s: float = B, weight_grad_s: float = 0.0, **kwargs
) -> PipelineCosts:
    chunk = ChunkCost(forward_s, backward_s, weight_grad_s, activation_bytes=3.0)
    return PipelineCosts(stages=tuple((chunk,) * vpp for _ in range(pp)), microbatches=m, **kwargs)


def uneven(pp: int, m: int, vpp: int = 1, seed: int = 0, **kwargs) -> PipelineCosts:
    rng = random.Random(seed)

    def chunk() -> ChunkCost:
        backward = rng.uniform(1.0, 4.0)
        return ChunkCost(rng.uniform(0.5, 2.0), backward, rng.uniform(0.2, 0.6) * backward, rng.uniform(1.0, 5.0))

    return PipelineCosts(stages=tuple(tuple(chunk() for _ in range(vpp)) for _ in range(pp)), microbatches=m, **kwargs)


def case(schedule: str, **kwargs) -> PipelineCosts:
    """An uneven case each schedule accepts."""
    return uneven(4, 8, vpp=3 if schedule == "interleaved" else 1, **kwargs)


# --- closed forms on uniform stages -------------------------------------------
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,m", [(4, 8), (8, 8), (4, 3), (1, 5), (6, 1), (16, 64)])
def test_gpipe_and_1f1b_take_m_plus_p_minus_1_slots(schedule, pp, m):
    sim = simulate(uniform(pp, m), schedule)
    assert sim.step_time_s == pytest.approx((m + pp - 1) * (F + B), rel=1e-9)
    assert sim.bubble_fraction() == pytest.approx((pp - 1) / (m + pp - 1), rel=1e-9)


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 8), (4, 3), (6, 1)])
def test_1f1b_stage_s_holds_min_p_minus_s_m_and_gpipe_holds_m(pp, m):
    assert simulate(uniform(pp, m), "1f1b").peak_in_flight == tuple(min(pp - s, m) for s in range(pp))
    assert simulate(uniform(pp, m), "gpipe").peak_in_flight == (m,) * pp
    assert simulate(uniform(pp, m), "1f1b").peak_activation_bytes == tuple(3.0 * min(pp - s, m) for s in range(pp))


@pytest.mark.parametrize("pp,vpp,m", [(4, 2, 8), (4, 3, 12), (2, 4, 6), (8, 2, 16), (4, 2, 4), (8, 4, 32)])
def test_interleaved_matches_its_closed_form_and_megatron_warmup(pp, vpp, m):
    sim = simulate(uniform(pp, m, vpp), "interleaved")
    assert sim.step_time_s == pytest.approx((m + (pp - 1) / vpp) * vpp * (F + B), rel=1e-9)
    assert sim.peak_in_flight == tuple(min((pp - s - 1) * 2 + (vpp - 1) * pp + 1, m * vpp) for s in range(pp))


# --- ZB-H1 --------------------------------------------------------------------
@pytest.mark.parametrize("pp,m", [(4, 8), (8, 24), (16, 64), (4, 4)])
def test_zb_h1_bubble_is_a_third_of_1f1b_when_f_b_w_are_equal(pp, m):
    # F = B = W: backward (B + W) is 2F, half of it weight gradient (the paper's setting).
    costs = uniform(pp, m, forward_s=B / 2, backward_s=B, weight_grad_s=B / 2)
    zb, one = simulate(costs, "zb-h1"), simulate(costs, "1f1b")
    work = m * (B / 2 + B)
    assert one.step_time_s - work == pytest.approx((pp - 1) * 3 * B / 2, rel=1e-9)
    assert zb.step_time_s - work == pytest.approx((pp - 1) * B / 2, rel=1e-9)  # (p-1)(F+B-W)
    assert (zb.step_time_s - work) / (one.step_time_s - work) == pytest.approx(1 / 3, rel=1e-9)
    assert zb.peak_in_flight == one.peak_in_flight
    assert zb.bubble_fraction() < one.bubble_fraction()


def test_zb_h1_reproduces_the_papers_bubble_on_its_measured_costs():
    # Qi et al. 2023, 1.5B-parameter setting on 16 stages (F, B, W in us; B is input grad only).
    pp, m, f, b, w = 16, 48, 14407.0, 14380.0, 9676.0
    costs = PipelineCosts(stages=((ChunkCost(f, b + w, w),),) * pp, microbatches=m)
    assert simulate(costs, "zb-h1").step_time_s - m * (f + b + w) == pytest.approx((pp - 1) * (f + b - w), rel=1e-9)


def test_zb_h1_holds_back_s_weight_gradients_on_stage_s():
    # The authors' get_hand_schedule(3, 4, ...) orders, stage by stage.
    expected = [
        "F0 F1 F2 B0 W0 F3 B1 W1 B2 W2 B3 W3",
        "F0 F1 B0 F2 B1 W0 F3 B2 W1 B3 W2 W3",
        "F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3",
    ]
    assert [" ".join(f"{kind}{i}" for kind, i, _ in zb_h1_order(3, 4, s)) for s in range(3)] == expected


# --- Megatron's orders --------------------------------------------------------
def test_1f1b_order_is_warmup_steady_cooldown():
    names = [f"{kind}{i}" for kind, i, _ in one_f_one_b_order(4, 6, 1)]
    assert names == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5".split()


def test_interleaved_order_walks_groups_of_pp_microbatches_through_the_chunks():
    # pp 2, vpp 2, m 4, stage 0: warm-up 2 + 2 = 4 forwards.
    names = [f"{kind}{i}c{v}" for kind, i, v in interleaved_order(2, 2, 4, 0)]
    assert names == (
        "F0c0 F1c0 F0c1 F1c1 F2c0 B0c1 F3c0 B1c1 F2c1 B0c0 F3c1 B1c0 B2c1 B3c1 B2c0 B3c0".split()
    )


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 4), (4, 2, 8), (4, 3, 4), (8, 4, 16)])
def test_interleaved_order_agrees_with_megatron_core(pp, vpp, m):
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    table = schedules.get_schedule_table(m, vpp, pp)
    for stage in range(pp):
        communicator = SimpleNamespace(
            pp_group=SimpleNamespace(size=lambda: pp, rank=lambda s=stage: s), virtual_pipeline_model_parallel_size=vpp
        )
        total, _, warmup, remaining = schedules.get_pp_rank_microbatches(m, vpp, pp, p2p_communicator=communicator)
        forward = [("F", *table[k]) for k in range(total)]
        backward = [("B", table[k][0], vpp - 1 - table[k][1]) for k in range(total)]
        expected = forward[:warmup]
        for k in range(remaining):
            expected += [forward[warmup + k], backward[k]]
        expected += backward[remaining:]
        assert interleaved_order(pp, vpp, m, stage) == expected


def test_schedules_reject_layouts_they_do_not_run():
    with pytest.raises(ValueError, match="divisible"):
        simulate(uniform(4, 6, vpp=2), "interleaved")
    with pytest.raises(ValueError, match="vpp"):
        simulate(uniform(4, 8, vpp=2), "1f1b")
    with pytest.raises(ValueError, match="vpp >= 2"):
        simulate(uniform(4, 8), "interleaved")
    with pytest.raises(ValueError, match="unknown schedule"):
        stage_order("pipedream", 4, 1, 8, 0)
    with pytest.raises(ValueError, match="dp_reduce_s"):
        simulate(uniform(4, 8, dp_reduce_s=(1.0,)), "1f1b")
    with pytest.raises(ValueError, match="weight_grad_s"):
        simulate(uniform(4, 8, backward_s=1.0, weight_grad_s=2.0), "zb-h1")


def test_an_order_waiting_on_itself_is_reported_not_looped():
    costs = uniform(2, 1)
    with pytest.raises(RuntimeError, match="deadlocks"):
        _execute(costs, "1f1b", [[("F", 0, 0), ("B", 0, 0)], [("B", 0, 0), ("F", 0, 0)]], record_events=True)


# --- uneven stages, communication, data parallelism ---------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", range(3))
def test_uneven_step_is_bounded_below_by_every_stage(schedule, seed):
    costs = case(schedule, seed=seed)
    sim = simulate(costs, schedule)
    pp, m = len(costs.stages), costs.microbatches
    model_chunks = [chunk for _, chunk in sorted((v * pp + s, c) for s, cs in enumerate(costs.stages) for v, c in enumerate(cs))]
    for s, chunks in enumerate(costs.stages):
        work = m * sum(c.forward_s + c.backward_s for c in chunks)
        assert sim.busy_s[s] == pytest.approx(work, rel=1e-12)
        # Stage s starts once micro batch 0's forward has reached it ...
        lead = sum(c.forward_s for c in model_chunks[:s])
        assert sim.step_time_s >= work + lead - 1e-9
        if schedule in ("gpipe", "1f1b"):
            # ... and its last op is a whole backward, whose gradient then has to reach stage 0.
            assert sim.step_time_s >= work + lead + sum(c.backward_s for c in model_chunks[:s]) - 1e-9
    slowest = max(sum(c.forward_s + c.backward_s for c in chunks) for chunks in costs.stages)
    assert sim.step_time_s >= m * slowest


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("uniform_stages", [True, False])
def test_p2p_latency_costs_at_least_the_round_trip(schedule, uniform_stages):
    p2p = 0.3
    vpp = 3 if schedule == "interleaved" else 1

    def costs(p2p_s):
        return uniform(4, 8, vpp, weight_grad_s=B / 2, p2p_s=p2p_s) if uniform_stages else case(schedule, p2p_s=p2p_s)

    slower = simulate(costs(p2p), schedule).step_time_s - simulate(costs(0.0), schedule).step_time_s
    assert slower >= 2 * (4 - 1) * p2p - 1e-9


def test_1f1b_p2p_latency_on_uniform_stages_adds_exactly_the_fill_and_drain_path():
    pp, m, p2p = 4, 8, 0.3
    sim = simulate(uniform(pp, m, p2p_s=p2p), "1f1b")
    assert sim.step_time_s >= (m + pp - 1) * (F + B) + 2 * (pp - 1) * p2p - 1e-9
    sends = [e for e in sim.events if e.kind == "send"]
    assert len(sends) == 2 * (pp - 1) * m
    assert all(e.end_s - e.start_s == pytest.approx(p2p) for e in sends)


def test_dp_reduce_hides_behind_the_last_backward_when_short():
    pp, m = 4, 8
    pipeline = (m + pp - 1) * (F + B)
    short = simulate(uniform(pp, m, dp_reduce_s=(0.5 * B,) * pp), "1f1b")
    assert short.step_time_s == pytest.approx(pipeline, rel=1e-9)
    assert [e.stage for e in short.events if e.kind == "dp"] == list(range(pp))


def test_dp_reduce_is_exposed_when_long():
    pp, m, reduce = 4, 8, 10 * B
    pipeline = (m + pp - 1) * (F + B)
    sim = simulate(uniform(pp, m, dp_reduce_s=(reduce,) * pp), "1f1b")
    # Stage 0 starts the step's last backward at pipeline - B.
    assert sim.step_time_s == pytest.approx(pipeline - B + reduce, rel=1e-9)
    assert sim.pipeline_time_s == pytest.approx(pipeline, rel=1e-9)


@pytest.mark.parametrize("reduce", [0.1 * B, 10 * B])
def test_dp_reduce_without_overlap_always_adds(reduce):
    pp, m, optimizer = 4, 8, 0.7
    pipeline = (m + pp - 1) * (F + B)
    sim = simulate(uniform(pp, m, dp_reduce_s=(reduce,) * pp, dp_overlap=False, optimizer_s=(optimizer,) * pp), "1f1b")
    assert sim.step_time_s == pytest.approx(pipeline + reduce + optimizer, rel=1e-9)
    overlapped = simulate(uniform(pp, m, dp_reduce_s=(reduce,) * pp, optimizer_s=(optimizer,) * pp), "1f1b")
    assert overlapped.step_time_s < sim.step_time_s


def test_optimizer_waits_for_both_compute_and_reduce_of_its_stage():
    costs = uneven(4, 8, dp_reduce_s=(5.0, 0.1, 9.0, 0.1), optimizer_s=(0.5, 0.6, 0.7, 0.8))
    sim = simulate(costs, "1f1b")
    for s in range(4):
        stage = [e for e in sim.events if e.stage == s]
        (optimizer,) = [e for e in stage if e.kind == "optimizer"]
        assert optimizer.start_s == pytest.approx(max(e.end_s for e in stage if e.kind != "optimizer"))
        assert optimizer.end_s - optimizer.start_s == pytest.approx(costs.optimizer_s[s])
    assert sim.step_time_s == pytest.approx(max(e.end_s for e in sim.events if e.kind == "optimizer"))


# --- the events ---------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_events_are_consistent(schedule):
    costs = case(schedule, seed=7, p2p_s=0.05)
    sim = simulate(costs, schedule)
    pp, vpp, m, hop = len(costs.stages), len(costs.stages[0]), costs.microbatches, costs.p2p_s
    compute = [e for e in sim.events if e.kind in COMPUTE_KINDS]

    # One op at a time per stage.
    for s in range(pp):
        ops = sorted((e for e in compute if e.stage == s), key=lambda e: (e.start_s, e.end_s))
        assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(ops, ops[1:]))
        assert sim.busy_s[s] == pytest.approx(sum(e.end_s - e.start_s for e in ops))

    # Every pass of every micro batch and chunk exactly once, on its stage.
    kinds = ("F", "B", "W") if schedule == "zb-h1" else ("F", "B")
    counts = Counter((e.kind, e.microbatch, e.chunk) for e in compute)
    assert counts == Counter({(k, i, c): 1 for k in kinds for i in range(m) for c in range(pp * vpp)})
    assert all(e.stage == e.chunk % pp for e in compute)

    # Dependencies hold in the event times.
    at = {(e.kind, e.microbatch, e.chunk): e for e in compute}
    last = pp * vpp - 1
    for i in range(m):
        for c in range(pp * vpp):
            if c > 0:
                assert at["F", i, c].start_s >= at["F", i, c - 1].end_s + hop - 1e-12
            before = at["F", i, c] if c == last else at["B", i, c + 1]
            assert at["B", i, c].start_s >= before.end_s + (hop if c < last else 0.0) - 1e-12
            if schedule == "zb-h1":
                assert at["W", i, c].start_s >= at["B", i, c].end_s - 1e-12

    # Peaks recomputed from the events: held from F start to B end.
    by_chunk = {v * pp + s: chunk for s, chunks in enumerate(costs.stages) for v, chunk in enumerate(chunks)}
    for s in range(pp):
        changes = sorted(
            [(e.start_s, 1, 1, by_chunk[e.chunk].activation_bytes) for e in compute if e.stage == s and e.kind == "F"]
            + [(e.end_s, 0, -1, -by_chunk[e.chunk].activation_bytes) for e in compute if e.stage == s and e.kind == "B"]
        )  # at equal times, frees (0) before allocations (1)
        held = held_bytes = peak = peak_bytes = 0
        for _, _, count, size in changes:
            held, held_bytes = held + count, held_bytes + size
            peak, peak_bytes = max(peak, held), max(peak_bytes, held_bytes)
        assert sim.peak_in_flight[s] == peak
        assert sim.peak_activation_bytes[s] == pytest.approx(peak_bytes)
    assert sim.pipeline_time_s == pytest.approx(max(e.end_s for e in compute))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_simulation_is_deterministic(schedule):
    costs = case(schedule, seed=3, p2p_s=0.1, dp_reduce_s=(1.0, 2.0, 3.0, 4.0), optimizer_s=(0.2,) * 4)
    assert simulate(costs, schedule) == simulate(costs, schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_simulation_without_events_has_the_same_times(schedule):
    """The search skips recording events; every figure is the same."""
    costs = case(schedule, seed=5, p2p_s=0.1, dp_reduce_s=(1.0, 2.0, 3.0, 4.0), optimizer_s=(0.2,) * 4)
    full, bare = simulate(costs, schedule), simulate(costs, schedule, record_events=False)
    assert full.events and bare.events == ()
    assert replace(full, events=()) == bare



def _ends_heavier(pp: int, m: int, vpp: int) -> PipelineCosts:
    """Stages as the planner prices them: equal but for the embedding and the
    LM head on the end stages, with send/recv, reduces and optimizer steps."""
    def chunk(s: int) -> ChunkCost:
        extra = 0.25 if s in (0, pp - 1) else 0.0
        return ChunkCost((1.0 + extra) / vpp, (2.0 + 2 * extra) / vpp, 0.8 / vpp, 1e9 / vpp)

    return PipelineCosts(stages=tuple((chunk(s),) * vpp for s in range(pp)), microbatches=m, p2p_s=0.01,
                         dp_reduce_s=(3.0,) * pp, optimizer_s=(0.3,) * pp)


def _extended_matches(long, whole, rel: float) -> None:
    assert long.events == ()
    assert long.step_time_s == pytest.approx(whole.step_time_s, rel=rel)
    assert long.pipeline_time_s == pytest.approx(whole.pipeline_time_s, rel=rel)
    assert long.busy_s == pytest.approx(whole.busy_s, rel=rel)
    assert long.peak_in_flight == whole.peak_in_flight and long.peak_activation_bytes == pytest.approx(whole.peak_activation_bytes)


@pytest.mark.parametrize("schedule,pp,vpp,m", [("1f1b", 4, 1, 500), ("1f1b", 3, 1, 411), ("zb-h1", 4, 1, 490), ("interleaved", 4, 3, 480),
                                               ("interleaved", 8, 2, 536), ("1f1b", 64, 1, 1100), ("interleaved", 32, 2, 800)])
def test_a_long_step_is_its_steady_state_extended(schedule, pp, vpp, m):
    """Beyond three runs' worth of micro batches, runs of k + r, 2k + r and
    3k + r extended linearly give the whole simulation's figures."""
    assert m > 6 * SETTLE_FROM
    costs = _ends_heavier(pp, m, vpp)
    _extended_matches(simulate_long(costs, schedule), simulate(costs, schedule), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "interleaved"])
def test_random_uneven_stages_settle_within_a_tenth_of_a_percent(schedule, seed):
    """Stages several times uneven settle slowly; runs that have not settled
    are made longer, and the extension stays within 0.1%."""
    pp, vpp = 5, 3 if schedule == "interleaved" else 1
    costs = replace(uneven(pp, 100 * pp + (0 if vpp > 1 else 2), vpp=vpp, seed=seed, p2p_s=0.3), dp_reduce_s=(2.0,) * pp)
    _extended_matches(simulate_long(costs, schedule), simulate(costs, schedule), rel=1e-3)


def test_a_step_that_has_not_settled_is_run_longer(monkeypatch):
    """Runs are only extended once two increments agree: with a check that
    never agrees, the step is simulated whole."""
    import loom.planner.schedule.simulate as simulate_module

    costs = _ends_heavier(4, 1000, 1)
    lengths = []
    real = simulate_module.simulate

    def counted(c, schedule, record_events=True):
        lengths.append(c.microbatches)
        return real(c, schedule, record_events)

    monkeypatch.setattr(simulate_module, "simulate", counted)
    monkeypatch.setattr(simulate_module, "_settled", lambda *runs: False)
    assert simulate_long(costs, "1f1b") == real(costs, "1f1b", record_events=False)
    assert lengths[-1] == 1000 and lengths[:-1] == [64, 128, 192, 256, 384] and 6 * 256 >= 1000


def test_a_short_step_or_gpipe_is_simulated_whole():
    short = _ends_heavier(4, 6 * SETTLE_FROM, 1)
    assert simulate_long(short, "1f1b") == simulate(short, "1f1b", record_events=False)
    long = _ends_heavier(4, 300, 1)
    assert simulate_long(long, "gpipe") == simulate(long, "gpipe", record_events=False)


def test_send_recv_told_apart_later_is_what_it_is_at_once():
    """The search builds its finalists with one simulation (the bubble
    holding the send/recv the pipeline exposes) and tells the two apart only
    for the plans it keeps: same step, same breakdown as two at once."""
    from conftest import make_job

    from loom.planner.plan import build_plan, with_pp_comm
    from loom.planner.specs.layout import Layout

    job = make_job("llama-3-8b", nodes=2, gbs=64, seq=4096)
    layout = Layout(tp=2, pp=4, dp=2, cp=1, vpp=2, micro_batch_size=1, global_batch_size=64, sequence_parallel=True)
    at_once, later = build_plan(job, layout), build_plan(job, layout, send_recv=False)
    assert later.step_time_s == at_once.step_time_s and not later.pp_comm_told
    assert later.step.breakdown_s["pp_comm"] == 0 and at_once.step.breakdown_s["pp_comm"] > 0
    assert with_pp_comm(later).step == at_once.step
