"""The Toto backbone, its checkpoints and the loaders of every model family.

`Toto` and `TotoConfig` import eagerly; the loaders (`load_backbone`, `load_tokenizer`,
`list_models`: backbone.py; `load_checkpoint`: tokens.py) are imported on first use, so that
training code does not pull in the model family registry it does not need.

    backbone = totobench.model.load_backbone("llama:DIR", tokenizer="dvae:encoder.pkl")
    codes = totobench.model.load_tokenizer("dvae:encoder.pkl").encode(frames)   # [N, H/8, W/8]
"""

from totobench.model.config import TotoConfig
from totobench.model.toto import Toto

__all__ = ["Toto", "TotoConfig", "Backbone", "ModelInputs", "load_backbone", "load_tokenizer", "list_models",
           "load_checkpoint"]

_LAZY = {"Backbone": "backbone", "ModelInputs": "backbone", "load_backbone": "backbone",
         "load_tokenizer": "backbone", "list_models": "backbone", "load_checkpoint": "tokens"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"totobench.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'totobench.model' has no attribute {name!r}")
