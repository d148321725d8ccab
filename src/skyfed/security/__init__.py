"""Privacy layers around the federation: secure aggregation (``secagg``) and differential
privacy (client-level DP-FedAvg and document-level DP-SGD: ``dp``, ``privacy``)."""
