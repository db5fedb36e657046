"""memprof: GPU memory profiling for fine-tuning vision transformers."""

__version__ = "0.1.0"
