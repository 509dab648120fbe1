"""Hugging Face interop (the only package that imports transformers / peft): conversion, LoRA."""
