"""Run-time plumbing every computing module may use: the device mesh and shardings,
multi-process start-up, Orbax checkpoints, preemption, and everything backend-specific
(`backend.py`). It imports nothing else of the package."""
