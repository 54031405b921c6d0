"""sande_fast."""
