"""TAID's moving interpolation t (`train_kd.py --method taid`; Shing et al., ICLR 2025, Sec. 3.3).

TAID distils toward r = softmax((1−t)·sg(z_student) + t·z_teacher) (kd/methods.py, `taid`), which
starts near the student and moves to the teacher while t rises. t rises by an adaptive rule:

    after optimizer step n with loss J_n (mean over the step's tokens, every process):
    δ_n      = (J_{n−1} − J_n) / J_{n−1}           the relative fall of the loss (from step 2 on)
    m_n      = β·m_{n−1} + (1−β)·δ_n                its momentum, m_0 = 0
    t_{n+1}  = min(t_end, max(t_start + (t_end − t_start)·n/N,  t_n + α·sigmoid(m_n)·(1 − t_n)))

with N the run's optimizer steps: t never falls below the linear path from t_start to t_end, and
moves ahead of it faster while the loss keeps falling. The defaults of the public TAID code:
t_start 0.4, t_end 1.0, α 5e-4, β 0.99. After the first step only J_1 is stored (t_2 = t_1 = t_start), as in
the public TAID code (github.com/gn64/TAID, src/distil_losses/taid.py). A step with a non-finite
loss leaves everything unchanged. t changes once per optimizer step, after it, from the loss of
all processes: every micro-batch of a step uses the same t for any split of the batch. The state
(t, m, J_{n−1}) goes into each checkpoint's trainer_state.json, so a resumed run moves t as the
uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Optional


class TaidSchedule:
    """`value` is t of the next optimizer step; `update` after each step."""

    def __init__(self, t_start: float, t_end: float, alpha: float, momentum: float):
        self.t_start, self.t_end, self.alpha, self.momentum = float(t_start), float(t_end), float(alpha), float(momentum)
        self.value = self.t_start
        self.momentum_value = 0.0
        self.previous_loss: Optional[float] = None

    @classmethod
    def of(cls, loss_config) -> "TaidSchedule":
        return cls(loss_config.taid_t_start, loss_config.taid_t_end, loss_config.taid_alpha, loss_config.taid_momentum)

    def update(self, loss: float, steps_done: int, total_steps: int) -> float:
        """t after a step whose loss (mean over its tokens, all processes) was `loss`; `steps_done`
        counts that step. Returns the new t."""
        if not math.isfinite(loss):
            return self.value
        if self.previous_loss is not None:
            relative_change = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
            self.momentum_value = self.momentum * self.momentum_value + (1 - self.momentum) * relative_change
            linear = self.t_start + (self.t_end - self.t_start) * min(steps_done / max(total_steps, 1), 1.0)
            adaptive = self.value + self.alpha * _sigmoid(self.momentum_value) * (1 - self.value)
            self.value = min(self.t_end, max(linear, adaptive))
        self.previous_loss = loss
        return self.value

    def state_dict(self) -> dict:
        return {"t": self.value, "momentum": self.momentum_value, "previous_loss": self.previous_loss}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.momentum_value = float(state["t"]), float(state["momentum"])
        self.previous_loss = None if state["previous_loss"] is None else float(state["previous_loss"])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
