"""medvlm.analysis: numbers: metrics, cluster-bootstrap statistics, controls, grounding, faithfulness."""
