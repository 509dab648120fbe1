"""The pipeline: the stage runner, how the stages connect, the results table, samples, the report, plots."""
