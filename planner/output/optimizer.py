"""The optimiser settings every framework's launch files share.

The layout does not depend on them and the user is expected to tune them,
but they are what a run starts with: one schedule for Megatron-LM,
DeepSpeed and torchtitan alike, at a peak learning rate that has trained a
model of that size. AdamW (betas 0.9, 0.95, eps 1e-8, weight decay 0.1),
gradients clipped at norm 1.0, linear warm-up over 1% of the steps, cosine
decay to 10% of the peak: GPT-3's recipe (Brown et al. 2020, sec. 2.3 and
appendix B), which Llama kept (Touvron et al. 2023, sec. 2.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loom.planner.specs.model import ModelSpec

# Peak learning rate by parameter count: GPT-3's models (Brown et al. 2020,
# Table 2.1), 125M to 175B; a model takes the rate of the row nearest its
# size on a log scale (GPT-3 175B's 174.6B parameters are its row's), counting
# the parameters a token activates (an MoE model's experts but the routed few).
GPT3_PEAK_LR = ((125e6, 6.0e-4), (350e6, 3.0e-4), (760e6, 2.5e-4), (1.3e9, 2.0e-4), (2.7e9, 1.6e-4), (6.7e9, 1.2e-4),
                (13e9, 1.0e-4), (175e9, 0.6e-4))
MIN_LR_FRACTION = 0.1
WARMUP_FRACTION = 0.01
WEIGHT_DECAY = 0.1
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
CLIP_GRAD = 1.0


@dataclass(frozen=True)
class Schedule:
    """A run's learning-rate schedule over ``steps`` optimizer steps."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    steps: int


def peak_lr(model: ModelSpec) -> float:
    """GPT-3's peak learning rate for a model of ``model``'s activated size (GPT3_PEAK_LR)."""
    size = model.active_params()
    return min(GPT3_PEAK_LR, key=lambda row: abs(math.log(size / row[0])))[1]


def schedule_of(model: ModelSpec, steps: int) -> Schedule:
    """The shared schedule for ``steps`` optimizer steps: warm-up at least
    one step and fewer than ``steps`` (megatron-core's
    OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps), so
    none for a one-step run."""
    lr = peak_lr(model)
    min_lr = float(f"{lr * MIN_LR_FRACTION:.6g}")  # 6e-06, not 6.000000000000001e-06
    return Schedule(peak_lr=lr, min_lr=min_lr, warmup_steps=min(max(1, round(WARMUP_FRACTION * steps)), steps - 1), steps=steps)
