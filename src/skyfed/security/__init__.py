"""Privacy layers: differential privacy (client-level DP-FedAvg and document-level DP-SGD)."""
