"""Alignment: SFT (chat format), DPO (preference pairs), the verifier."""
