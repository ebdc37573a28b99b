"""Γ without tuning (`train_kd.py --gamma auto`): selfevo's threshold set from the student's own learning state.

The paper presets Γ = 0.4 (Eq. 8: a token is hard when d = KL(ỹ‖q) > Γ) and names it as its
limitation: "one key factor Γ is empirical and preset ... It would be sensible and elegant to
dynamically determine the threshold". Here Γ follows the difficulty the student itself shows on
the tokens it has just trained on, so that "hard" means hard relative to its current state:

    d_Q(t)   = the Q-quantile of d over every counted token of optimizer step t
               (all micro-batches and all processes, gathered: the same value for any micro-batching)
    Γ_1      = +inf                          step 1 has no history: every token is easy (noevo's loss)
    Γ_2      = d_Q(1)
    Γ_{t+1}  = M·Γ_t + (1−M)·d_Q(t)          an exponential moving average with momentum M

Γ changes once per optimizer step, after it: every micro-batch of step t uses Γ_t, so the
threshold of a step does not depend on how it is split into micro-batches or processes. The
state (Γ and the steps measured) goes into each checkpoint's trainer_state.json, so a resumed run
uses the Γ of the uninterrupted one. With Q = 0.5 (the default) about half of the recent tokens
count as hard; while the student improves d falls and Γ follows it with a lag of about 1/(1−M)
steps (M = 0.9: ten steps), so the hard fraction sits a little under 1−Q. d_Q(t) is the quantile
with linear interpolation between order statistics (numpy's default); tokens whose d is not
finite (a step with a NaN loss) are left out, and a step without any finite d leaves Γ unchanged.
"""

from __future__ import annotations

import math

import torch

DEFAULT_QUANTILE = 0.5
DEFAULT_MOMENTUM = 0.9


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor, linear interpolation between order statistics (numpy's default)."""
    ordered = torch.sort(values.double().flatten()).values
    position = q * (ordered.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


class AutoGamma:
    """The running threshold: `value` is Γ of the next optimizer step; `update` after each step."""

    def __init__(self, quantile_q: float = DEFAULT_QUANTILE, momentum: float = DEFAULT_MOMENTUM):
        if not 0.0 < quantile_q < 1.0:
            raise ValueError(f"gamma_quantile must lie in (0, 1), got {quantile_q!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"gamma_momentum must lie in [0, 1), got {momentum!r}")
        self.quantile_q, self.momentum = float(quantile_q), float(momentum)
        self.value, self.steps_measured = math.inf, 0

    def update(self, difficulties: torch.Tensor) -> float:
        """Γ after a step whose counted tokens (all of them, every process) had these d; returns the new Γ."""
        finite = difficulties[torch.isfinite(difficulties)]
        if finite.numel() == 0:
            return self.value
        measured = quantile(finite, self.quantile_q)
        if self.steps_measured == 0:
            self.value = measured
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * measured
        self.steps_measured += 1
        return self.value

    def state_dict(self) -> dict:
        # +inf is not JSON: the first step's Γ is stored as None
        return {"gamma": self.value if math.isfinite(self.value) else None, "steps_measured": self.steps_measured}

    def load_state_dict(self, state: dict) -> None:
        self.value = math.inf if state["gamma"] is None else float(state["gamma"])
        self.steps_measured = int(state["steps_measured"])
