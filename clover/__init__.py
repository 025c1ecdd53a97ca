"""clover: Clover-2 speculative decoding (draft model, data generation, training, lossless tree decoding,
evaluation)."""
__version__ = "0.1.0"

from clover.errors import CloverError  # noqa: E402
from clover.generate.speculative import CloverModel, EagleModel, SpeculativeModel  # noqa: E402
from clover.model.base import BaseModel  # noqa: E402
from clover.model.loading import resolve_model_path  # noqa: E402

__all__ = ["BaseModel", "CloverError", "CloverModel", "EagleModel", "SpeculativeModel", "resolve_model_path"]
