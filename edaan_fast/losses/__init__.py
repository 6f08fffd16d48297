"""edaan_fast.losses."""
