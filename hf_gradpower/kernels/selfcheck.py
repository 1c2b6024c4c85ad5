"""The first-use self-check of a fast backend on one (device, dtype combination)."""

from __future__ import annotations

from types import ModuleType

import torch


def check(backend: ModuleType, device: torch.device, dtypes: tuple) -> None:
    """Raise if ``backend`` cannot serve ``dtypes`` on ``device``."""
    backend.prepare()
