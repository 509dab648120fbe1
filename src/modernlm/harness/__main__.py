"""`python -m modernlm.harness ARGS`: lm-eval's own command line with the model "modernlm" registered,
for lm-eval releases that do not yet discover installed models by entry point:

    python -m modernlm.harness run --model modernlm --model_args pretrained=runs/sft --tasks sst2
"""

from lm_eval.__main__ import cli_evaluate

import modernlm.harness.lm  # noqa: F401  (registers "modernlm")

if __name__ == "__main__":
    cli_evaluate()
