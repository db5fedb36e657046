"""The simulation: training steps traced on fake tensors (tracker, tracing, fake_compat, attribution), the
rules where CUDA allocates differently from the CPU (rules, distributed), and the caching-allocator model the
stream is replayed through (allocator); `simulate` puts them together into a prediction."""
