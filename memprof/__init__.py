"""memprof: GPU memory profiling for fine-tuning vision transformers.

The Python API (memprof.api) is imported on first use, so `import memprof` (and `memprof --help`) does not
import torch: `memprof.predict`, `memprof.predict_step`, `memprof.measure`, `memprof.measure_step`,
`memprof.Result`.
"""

__version__ = "0.1.0"

__all__ = ["predict", "predict_step", "measure", "measure_step", "Result", "simulated_cuda"]


def __getattr__(name: str):
    if name == "simulated_cuda":  # memprof.script: a simulated CUDA device around any code
        from memprof.script.device import simulated_cuda

        return simulated_cuda
    if name in __all__:
        from memprof import api

        return getattr(api, name)
    raise AttributeError(f"module 'memprof' has no attribute '{name}'")
