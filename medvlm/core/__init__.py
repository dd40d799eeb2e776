"""medvlm.core: models and passes: the backends' contract, packed scoring, attention capture,
gradient maps, the results store, the run's wiring."""
