"""Evaluation: perplexity, task evaluation and metrics, the sinks measurements, checkpoints side by side."""
