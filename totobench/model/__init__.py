"""The Toto backbone, its checkpoints and the backbone loader.

`Toto` and `TotoConfig` import eagerly; `Backbone`, `load_backbone`, `list_models` and
`load_checkpoint` (backbone.py) are imported on first use, so that training code does not pull in
the loader and the model family registry it does not need.
"""

from totobench.model.config import TotoConfig
from totobench.model.toto import Toto

__all__ = ["Toto", "TotoConfig", "Backbone", "load_backbone", "list_models", "load_checkpoint"]

_LAZY = ("Backbone", "load_backbone", "list_models", "load_checkpoint")


def __getattr__(name):
    if name in _LAZY:
        from totobench.model import backbone
        return getattr(backbone, name)
    raise AttributeError(f"module 'totobench.model' has no attribute {name!r}")
