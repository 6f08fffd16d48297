"""edaan_fast.engine."""
