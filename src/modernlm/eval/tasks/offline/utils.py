"""Helpers of the offline task YAMLs beside this file (lm-eval loads them by `!function utils.NAME`)."""

import re

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["documents", "process_results", "wikitext_detokenizer"]

HEADING = re.compile(r"^ = [^=].* = \n?$")  # " = Robert Boulter = ": an article starts (" = = x = = " is a section)


def documents(lines: datasets.Dataset) -> datasets.Dataset:
    """WikiText's raw lines (read with their line breaks) -> one {"page": text} per article."""
    pages: list[str] = []
    for line in lines["text"]:
        if HEADING.match(line) or not pages:
            pages.append("")
        pages[-1] += line
    return datasets.Dataset.from_dict({"page": [p for p in pages if p.strip()]})
