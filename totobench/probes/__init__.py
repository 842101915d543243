"""Probes: heads trained (or not) on frozen features. Each is registered once, by name, in
`totobench.registry.PROBES` (`totobench ls probes`), and implements the contract of
`totobench.probes.base`: a typed spec and `fit(train, val, spec, ctx) -> {layer: LayerResult}`."""
