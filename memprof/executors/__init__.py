"""Where configurations run: `runner` (a grid, one record each, placed by the backend's isolation: here, in
pooled workers, or a fresh process each), `worker` (the `python -m memprof.executors.worker` child, which finds
its backend in the registry) and `ray_executor` (the same worker as Ray tasks)."""
