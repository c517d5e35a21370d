"""Loss-spike detection against a robust running statistic (median and MAD of recent losses)."""

from __future__ import annotations

import math
import statistics
from collections import deque

from keel.errors import KeelError

MAD_TO_SIGMA = 1.4826  # sigma = 1.4826 * MAD for normally distributed values


class LossSpikeDetector:
    """Flags a training loss far above the recent typical loss.

    With m = median and MAD = median(|l_i - m|) of the last `window` non-spike losses and
    sigma = 1.4826 * MAD, a loss l is a spike when, after at least `min_history` losses were seen,

        l > m + factor * sigma   and   l > m + min_rise * |m|.

    The median and MAD ignore the occasional outlier that a mean and standard deviation would follow, and
    the second condition keeps a very flat loss curve (MAD near 0) from flagging ordinary noise. Spikes are
    not added to the window, so a long spike does not become the new normal. Non-finite losses are not
    spikes: the non-finite guard handles them.

    What to do on a spike follows PaLM (Chowdhery et al. 2022, Section 5.1): restart from a checkpoint
    before the spike and skip the data batches seen around it. PaLM does not say how spikes were
    detected; this statistic is keel's choice.
    """

    def __init__(self, window: int = 100, factor: float = 6.0, min_history: int = 20, min_rise: float = 0.05):
        if window < 1 or min_history < 1 or min_history > window or factor <= 0 or min_rise < 0:
            raise KeelError(
                f"LossSpikeDetector: window={window}, factor={factor}, min_history={min_history}, "
                f"min_rise={min_rise}; allowed: 1 <= min_history <= window, factor > 0, min_rise >= 0"
            )
        self.window = int(window)
        self.factor = float(factor)
        self.min_history = int(min_history)
        self.min_rise = float(min_rise)
        self.losses: deque[float] = deque(maxlen=self.window)

    def threshold(self) -> float | None:
        """The loss above which the next value counts as a spike; None until `min_history` losses were seen."""
        if len(self.losses) < self.min_history:
            return None
        median = statistics.median(self.losses)
        mad = statistics.median(abs(x - median) for x in self.losses)
        return median + max(self.factor * MAD_TO_SIGMA * mad, self.min_rise * abs(median))

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike against the current window (does not change the state)."""
        threshold = self.threshold()
        return threshold is not None and math.isfinite(loss) and loss > threshold

    def update(self, loss: float) -> bool:
        """Check `loss`, then add it to the window unless it is a spike or not finite; return whether it is a spike."""
        loss = float(loss)
        spike = self.is_spike(loss)
        if not spike and math.isfinite(loss):
            self.losses.append(loss)
        return spike

    def state_dict(self) -> dict:
        """The window of recent losses; plain floats, safe for `torch.load(weights_only=True)`."""
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(x) for x in state.get("losses", [])), maxlen=self.window)
