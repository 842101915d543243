"""The Toto backbone, its checkpoints and the model registry.

`Toto` and `TotoConfig` import eagerly; `Backbone` and `load_backbone` are imported on first use so
that training code does not pull in the registry (and the tokenizer) it does not need.
"""

from totobench.model.toto import Toto, TotoConfig

__all__ = ["Toto", "TotoConfig", "Backbone", "load_backbone", "list_models"]


def __getattr__(name):
    if name in ("Backbone", "load_backbone", "list_models"):
        from totobench.model import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'totobench.model' has no attribute {name!r}")
