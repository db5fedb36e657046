"""Where a script's training steps begin and end, counted in one place for the simulated device
(memprof.script.device.SimulatedCuda) and the measured one (memprof.script.measure.MeasuredCuda).

A step is a backward followed by an optimizer step (the step ends with the optimizer's post hook), or a backward
during which optimizers stepped from gradient hooks (optimizer-in-backward: the step ends with the backward). A
backward called inside another (a reentrant checkpoint's recompute runs `torch.autograd.backward` within the
outer one) is part of the outer one: it marks no phase and counts no step. After `max_steps` steps the code
is stopped with StopSimulation (a BaseException: the user's `except Exception` does not catch it).
"""

from __future__ import annotations


class StopSimulation(BaseException):
    """Raised after the requested number of optimizer steps (a BaseException: the user's `except Exception`
    does not catch it); the runner ends the script there."""


class StepCounting:
    """Mixin: `self.detected["steps"]` counted from backward calls and optimizer post hooks. The class using it
    gives `_phase(name)` (a phase boundary), `detected` and `max_steps`, and calls `_start_counting()` on entry."""

    def _start_counting(self) -> None:
        self._in_backward, self._since_backward, self._stepped_in_backward = 0, False, False

    def _backward(self, original):
        """torch.autograd.backward, wrapped: the backward phase, and the end of an optimizer-in-backward step."""
        counter = self

        def backward(*args, **kwargs):
            outer = counter._in_backward == 0
            if outer:
                counter._phase("backward")
                counter._stepped_in_backward = False
            counter._in_backward += 1
            try:
                out = original(*args, **kwargs)
            finally:
                counter._in_backward -= 1
            if outer:
                counter._since_backward = True
                if counter._stepped_in_backward:  # optimizer-in-backward: the step ends with the backward
                    counter._step_done()
            return out

        return backward

    def _optimizer_stepped(self) -> None:
        """From the optimizer post hook: inside a backward, an optimizer-in-backward step; after one, the step's end."""
        if self._in_backward:
            self._stepped_in_backward = True
            self.detected["optimizer_in_backward"] = True
        elif self._since_backward:
            self._since_backward = False
            self._step_done()

    def _step_done(self) -> None:
        self.detected["steps"] += 1
        if self.max_steps is not None and self.detected["steps"] >= self.max_steps:
            raise StopSimulation(self.detected["steps"])
