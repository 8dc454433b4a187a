"""The model a run starts from: a fresh ICNet, ImageNet weights for EfficientNet-Lite encoders, and the tensors of
``model.init_from`` where names and shapes match."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.icnet import ICNet, ICNetConfig, build_icnet
from .config import ConfigError


def build_model(config: dict, arch: ICNetConfig, log: Any = print, initial_weights: bool = True) -> ICNet:
    """A fresh ICNet of ``arch``; ImageNet weights for EfficientNet-Lite backbones with model.pretrained, and
    model.init_from's tensors where shapes match (``initial_weights=False``: neither, for a resumed run, whose
    weights come from its state)."""
    model = build_icnet(arch)
    m = config["model"]
    if not initial_weights:
        return model
    if m["pretrained"] == "imagenet":
        if not arch.backbone.startswith("efficientnet_lite"):
            raise ConfigError(f"model.pretrained=imagenet is available for efficientnet_lite* backbones only, not "
                              f"{arch.backbone!r} (train it from scratch: model.pretrained=null)")
        try:
            from ..models.efficientnet import load_imagenet_weights
        except ImportError as e:
            raise ConfigError(f"EfficientNet-Lite support (icnet_ros.models.efficientnet) is unavailable: {e}") \
                from e
        try:
            path = load_imagenet_weights(model.backbone.backbone, arch.backbone)
        except ModuleNotFoundError as e:
            raise ConfigError(str(e)) from e
        log(f"loaded ImageNet weights for {arch.backbone} from {path}")
    if m["init_from"]:
        init_from_checkpoint(model, m["init_from"], log)
    return model


def init_from_checkpoint(model: ICNet, path: str, log: Any = print) -> None:
    """Copy the tensors of native checkpoint ``path`` whose names and shapes match (e.g. all but the classifiers
    when the class count differs). The file is read as every checkpoint is (:func:`~icnet_ros.checkpoint.load_model`:
    ``~`` expanded, a corrupt, truncated or mismatched file, tensors of a wrong type or with NaN a one-line
    CheckpointError); before, ``~/x.safetensors`` passed the metadata check and ended in a FileNotFoundError
    traceback, and the tensors were copied unchecked."""
    from safetensors import safe_open

    from ..checkpoint import load_model

    checked = load_model(path)
    with safe_open(str(Path(path).expanduser()), framework="pt") as f:  # (an auxiliary head the file lacks: not copied)
        stored = set(f.keys())
    state = {k: v for k, v in checked.state_dict().items() if k in stored}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    with torch.no_grad():
        for k, v in usable.items():
            own[k].copy_(v.to(own[k].dtype))
    log(f"initialised {len(usable)}/{len(own)} tensors from {path}"
        + (f"; kept fresh: {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}" if skipped else ""))
