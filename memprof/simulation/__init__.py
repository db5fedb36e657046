"""The simulation: training steps traced on fake tensors (tracker, tracing, fake_compat, attribution), the
rules where CUDA allocates differently from the CPU (rules, distributed), and the caching-allocator model the
stream is replayed through (allocator); `simulate` puts them together into a prediction."""

# what each storage is (memprof.simulation.tracing); torch-free, so reports can name them without torch
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "workspace",
              "communication")  # DDP buckets, FSDP all-gather / reduce-scatter buffers (memprof.simulation.distributed)
