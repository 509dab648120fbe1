"""modernlm: a readable PyTorch toolkit for the whole life of a small modern language model.

Nothing heavy is imported here, so `modernlm --help` answers without loading torch.
"""

__version__ = "0.1.0"
