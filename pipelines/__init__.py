"""Pipeline adapters (block contracts per transformer family) and offline pipelines."""
