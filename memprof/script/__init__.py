"""Ordinary CUDA code on a simulated CUDA device: `memprof.simulated_cuda` and `memprof script FILE`.

memprof.script.device: the simulated device (a context manager); memprof.script.runner: a script run as
__main__ inside it, its summary and its record; memprof.script.cli: the `memprof script` subcommand.
"""

from memprof.script.device import SimulatedCuda, UnsupportedCall, simulated_cuda

__all__ = ["SimulatedCuda", "UnsupportedCall", "simulated_cuda"]
