"""medvlm.report: outputs: tables, figures and report.md."""
