"""The pipeline: stage runner, report, plots."""
