"""dit_accel."""
