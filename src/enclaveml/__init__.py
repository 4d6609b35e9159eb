"""enclaveml: confidential machine learning on trusted execution environments."""

from enclaveml.errors import EnclaveMLError

__all__ = ["EnclaveMLError", "__version__"]
__version__ = "0.1.0"
