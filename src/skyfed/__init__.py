"""skyfed: federated training of language models across clouds."""

__version__ = "0.1.0"
