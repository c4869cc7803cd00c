"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from petmonai.errors import PetmonaiError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PetmonaiError("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PetmonaiError(f"unknown device '{name}' (auto, cpu or cuda)")
    return torch.device(name)
