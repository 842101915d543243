"""Probes: heads trained (or not) on frozen features, registered by name.

PROBES says in one line what each probe does (`totobench ls probes` prints it); PROBE_TARGETS
says where it lives as "module:attribute", imported only when asked for so listing stays fast.
Add your probe to both.
"""

from __future__ import annotations

import difflib
import importlib

from totobench.errors import ConfigError

PROBES: dict[str, str] = {
    "linear": "linear heads for all layers x lrs x wds in one pass; picked on a train hold-out",
    "attentive": "a learned query attends over one layer's tokens, then a linear classifier",
    "knn": "cosine kNN (faiss), temperature-weighted votes, all k from one search",
    "label_propagation": "first-frame masks carried through a video by feature affinity (DAVIS)",
    "sta_head": "next-active-object boxes, noun, verb and time to contact (Ego4D STA)",
    "bc_policy": "MLP policy by behaviour cloning on frozen frame features (robot)",
}

PROBE_TARGETS: dict[str, str] = {
    "linear": "totobench.probes.linear:fit_linear_grid",
    "attentive": "totobench.probes.attentive:fit_attentive_grid",
    "knn": "totobench.probes.knn:fit_knn_layers",
    "label_propagation": "totobench.probes.label_propagation:label_propagation",
    "sta_head": "totobench.probes.sta_head:train_sta_head",
}


def get_probe(name: str):
    """The class or function registered as `name`.

    Raises ConfigError for an unknown name (with close matches) or a probe not available yet.
    """
    if name not in PROBES:
        close = difflib.get_close_matches(name, list(PROBES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(PROBES))}"
        raise ConfigError(f"unknown probe '{name}'{hint}")
    if name not in PROBE_TARGETS:
        raise ConfigError(f"probe '{name}' is registered but not implemented yet")
    module, attribute = PROBE_TARGETS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
