"""totobench: layer-by-layer evaluation of autoregressive video transformers."""

__version__ = "0.1.0"
