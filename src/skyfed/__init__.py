"""skyfed: federated training of language models across clouds (see skyfed.api)."""

from skyfed.api import Result, load_config, run
from skyfed.errors import SkyfedError

__version__ = "0.1.0"

__all__ = ["Result", "SkyfedError", "__version__", "load_config", "run"]
