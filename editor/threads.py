"""How many CPU threads torch gets: one rule for the server's model worker and the command line.

Pure Python until a count is applied: torch is imported inside `use_torch_threads` only.
"""

from __future__ import annotations

import os


def torch_threads(configured: int) -> int | None:
    """The thread count for `configured` (EDITOR_TORCH_THREADS or --threads; 0: the default), or
    None to leave torch's own choice. The default is one core fewer than the machine has: with a
    thread on every core, one core taken by anything else (the server's event loop, another
    process) stalls each step at OpenMP's barrier, which made fills 6-13x slower under load."""
    if configured > 0:
        return configured
    if os.environ.get("OMP_NUM_THREADS"):  # Ray (or the user) chose: torch's own default stands
        return None
    return max(1, (os.cpu_count() or 1) - 1)


def use_torch_threads(configured: int) -> int | None:
    """Apply `torch_threads(configured)` to torch; returns what was applied (None: nothing)."""
    threads = torch_threads(configured)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


__all__ = ["torch_threads", "use_torch_threads"]
