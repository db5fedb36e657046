"""Ordinary CUDA code on a simulated CUDA device: `memprof.simulated_cuda` and `memprof script FILE`.

memprof.script.device: the simulated device (a context manager); memprof.script.record: the record of what
ran; memprof.script.runner: a script run as __main__ inside it and its summary; memprof.script.measure: the same
script on a real GPU (`--backend cuda`); memprof.script.cli: the `memprof script` subcommand.
"""

__all__ = ["SimulatedCuda", "UnsupportedCall", "simulated_cuda"]


def __getattr__(name: str):
    """The device's names, imported on first use (`memprof --help` builds the script parser without torch)."""
    if name in __all__:
        from memprof.script import device

        return getattr(device, name)
    raise AttributeError(f"module 'memprof.script' has no attribute '{name}'")
