"""Feature-caching and forecasting plugins, one module per technique (FORA, ToCa, Δ-DiT, TaylorSeer, first-block caching, CFG sharing)."""
