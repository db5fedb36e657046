"""Where configurations run: `runner` (a grid through worker processes, one record each), `worker` (the
`python -m memprof.executors.worker` child) and `ray_executor` (the same worker as Ray tasks)."""
