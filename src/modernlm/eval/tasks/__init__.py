"""lm-evaluation-harness for every model modernlm loads: the harness model (`lm.py`), runs of its
tasks with tables (`run.py`), and offline task definitions (`tasks/`). The only package that
imports lm_eval (the `harness` extra)."""
