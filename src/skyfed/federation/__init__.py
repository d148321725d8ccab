"""The federation engine, its messages, transports and aggregation strategies."""
