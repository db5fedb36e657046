"""The planner: the largest micro-batch that fits a card (`fit`) and the cheapest change that makes a run
fit (`advise`), each probe a prediction or measurement through memprof.api."""
