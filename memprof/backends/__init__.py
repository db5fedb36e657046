"""Backends behind one seam: `base` (the Backend protocol and its Outcome), `registry` (the one place that
finds a backend by name: built-ins, the `memprof.backends` entry-point group, `register`), and the built-ins:
`simulate` (the engine's prediction, with its timeline and snapshot files), `cuda` (torch.cuda and NVML,
`nvml`; DDP/FSDP at world size 1 through `distributed`) and `cpu` (real CPU tensors under the simulation's
tracker). Backends sit above the engine (memprof.simulation) and reports, below planning, run and the front
doors (tests/test_layering.py)."""
