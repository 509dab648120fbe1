"""A .gguf file's weights as they are: Q8_0 / Q4_0 / Q4_1 blocks into quant.QLinear, without float32.

(Being written: until then `load_gguf` declines every file and `modernlm.load` takes transformers' path.)
"""

from __future__ import annotations


def load_gguf(path, quantize: str, *, device=None):
    return None
