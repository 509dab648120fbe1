"""The `modernlm` commands, one module each (cli.py dispatches); shared checks below."""

from __future__ import annotations

from modernlm.errors import UserError


def check_scoring(batch_size: int, max_tokens: int | None = None) -> None:
    """The eval commands' batch_size (>= 1) and max_tokens (>= 0, 0 = all), before any loading: a
    negative batch_size scored nothing and reported perplexity 1.00."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 0:
        raise UserError(f"max_tokens must be >= 0 (0 = all), got {max_tokens}")
