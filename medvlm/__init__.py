"""medvlm: the core shared by the LLaVA-Rad and MedGemma backends and the runner, by stage.

core      models and passes: the backend contract (backend), packed scoring (engine), exact
          attention capture (capture), gradient maps (attribution), answer scoring, the results
          store and map reader (store, maps), configuration (config), tiny random-weight models,
          and the run's wiring (pipeline, runner, preflight)
data      inputs: the question CSV (data), images, public label files (questions, findings),
          expert regions (regions, region_formats), the demo's data
analysis  numbers: metrics, cluster-bootstrap statistics (stats, intervals, tables), the
          analysis tables, controls, grounding, faithfulness, attention sinks, validity
report    outputs: figures, forest plots, report.md and the analysis phase (reporting)
"""
