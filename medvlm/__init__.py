"""medvlm: the core shared by the LLaVA-Rad and MedGemma backends and the runner.

attention capture (capture), layer/head aggregation (aggregate), image geometry (geometry),
answer scoring (scoring), data loading and validation (data), statistics (stats, metrics),
figures (figures), the results store (store), tiny random-weight models (tiny).
"""
