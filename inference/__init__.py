"""Step 4: per-topic evaluation and routing collection."""
