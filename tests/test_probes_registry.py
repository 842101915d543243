import pytest

from totobench.errors import ConfigError
from totobench.probes import PROBE_TARGETS, PROBES, get_probe


def test_registry_names_resolve_lazily_to_the_probe_functions():
    from totobench.probes.knn import fit_knn_layers
    from totobench.probes.linear import fit_linear_grid
    assert {"linear", "attentive", "knn", "label_propagation", "sta_head", "bc_policy"} <= set(PROBES)
    assert all(isinstance(d, str) and d and "\n" not in d for d in PROBES.values())
    assert set(PROBE_TARGETS) <= set(PROBES)
    assert get_probe("linear") is fit_linear_grid
    assert get_probe("knn") is fit_knn_layers


def test_unknown_probe_names_suggest_close_matches():
    with pytest.raises(ConfigError, match="did you mean linear"):
        get_probe("lineer")
