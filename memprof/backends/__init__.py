"""Measuring backends: `cpu` (real CPU tensors under the simulation's tracker) and `cuda` (torch.cuda and
NVML, `nvml`). The predicting backend is memprof.simulation.simulate."""
