"""Loading pretrained weights from local files (never from a hub at run time)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmbalance.errors import ConfigError


def require_weights_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"Pretrained weights for {what} were asked for at '{p}', but that path does not "
            f"exist. Weights are read from local files only (nothing is downloaded at run "
            f"time): put the file there, or drop the setting to train from random init."
        )
    return p


def load_state_dict_file(
    module: nn.Module,
    path: str | Path,
    what: str,
    rename: Callable[[str], str | None] | None = None,
    strict: bool = True,
) -> tuple[list[str], list[str]]:
    """Load a ``torch.save``'d state dict (optionally nested under 'state_dict'/'model').

    ``rename`` maps checkpoint keys to module keys (None drops a key). Returns the missing and
    unexpected keys when ``strict`` is False.
    """
    p = require_weights_path(path, what)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"Could not read pretrained weights for {what} from '{p}': {exc}. Expected a "
            f"state dict saved with torch.save."
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if rename is not None:
        state = {nk: v for k, v in state.items() if (nk := rename(k)) is not None}
    result = module.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ConfigError(
            f"Pretrained weights for {what} at '{p}' do not match the model: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}. Check that "
            f"the file is for this backbone."
        )
    return list(result.missing_keys), list(result.unexpected_keys)
