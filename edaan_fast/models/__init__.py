"""edaan_fast.models."""
