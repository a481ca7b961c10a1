"""Who may use the pool and what they used: API keys, usage accounting, Prometheus series."""
