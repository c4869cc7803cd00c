"""Loading a fold's weights from a checkpoint, safely (tensors only, no pickled code)."""

from __future__ import annotations

from pathlib import Path

import torch

from petmonai.errors import PetmonaiError


def load_weights(net: torch.nn.Module, path: str | Path, device: torch.device) -> torch.nn.Module:
    """Load a checkpoint saved by the engine (safe: ``weights_only=True``)."""
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PetmonaiError(f"{path}: checkpoint not found") from None
    except Exception as err:
        raise PetmonaiError(f"{path}: cannot load checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a resumable checkpoint holds more than the weights
    net.load_state_dict(state)
    return net
