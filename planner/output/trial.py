"""Trial runs (``loom plan --trials N``): a short run of each of the top
plans whose logs ``loom compare`` and ``loom calibrate`` read.

A trial runs ``TRIAL_ITERATIONS`` iterations and logs every
``TRIAL_LOG_INTERVAL``: the first logged interval (two from Megatron core
0.16, profiles/run_logs/megatron.py) is warm-up, the other five or
six (torchtitan also logs step 1) the steady state whose median is compared. Each framework's files switch on
what it can report per term (see the emitters): Megatron's
``--log-throughput`` and ``--timing-log-level 1`` (its per-iteration timers;
level 1 adds a barrier around the once-per-step phases only), DeepSpeed's
``wall_clock_breakdown`` at ``log_level: info`` (DeepSpeed >= 0.17.6 logs at
WARNING by default, which hides the throughput line), torchtitan's profiler
(one traced step, ``TRIAL_PROFILE_STEP``).
"""

from __future__ import annotations

from dataclasses import replace

from loom.planner.specs.job import Job

TRIAL_ITERATIONS = 30
TRIAL_LOG_INTERVAL = 5
TRIAL_PROFILE_STEP = 20  # torchtitan profiles one step (its profiler warms up 3 steps before it)


def trial_job(job: Job) -> Job:
    """``job`` as a trial runs it: few iterations, every report switched on."""
    return replace(job, train_iters=TRIAL_ITERATIONS, trial=True)
