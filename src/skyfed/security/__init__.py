"""Privacy layers around the federation: secure aggregation (``secagg``)."""
