"""edaan_fast.data."""
