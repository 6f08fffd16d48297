"""edaan_fast.viz."""
