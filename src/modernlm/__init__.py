"""modernlm: a readable PyTorch toolkit for the whole life of a small modern language model.

    from modernlm import load, ModernDecoderLM, ModelConfig

Nothing heavy is imported here, so `modernlm --help` answers without loading torch: these names
come from their modules on first use (a module-level `__getattr__`, PEP 562).
"""

from importlib.metadata import version

__version__ = version("modernlm")  # pyproject.toml's, the one place it is written
__all__ = ["LM", "ModelConfig", "ModernDecoderLM", "Sampling", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "LM"):
        from modernlm import api

        return getattr(api, name)
    if name in ("ModernDecoderLM", "ModelConfig"):
        from modernlm import model

        return getattr(model, name)
    if name == "Sampling":
        from modernlm.generation import Sampling

        return Sampling
    raise AttributeError(f"module 'modernlm' has no attribute {name!r}")
