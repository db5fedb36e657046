"""The planner: the largest micro-batch that fits a card (`fit`: a search over any backend's probes,
memprof.backends.base.Backend.probe) and the cheapest change that makes a run fit (`advise`: candidates as
data). It imports backends, never the runner that calls it."""
