"""charlstm: a character-level recurrent text generator.

Train on your own text, generate more of it, and measure what the model learned. The public entry
points are `load` (a trained run, ready to generate and evaluate) and `train`.
"""

from charlstm.api import TextModel, load, train
from charlstm.config import RunConfig
from charlstm.errors import UserError

__all__ = ["RunConfig", "TextModel", "UserError", "load", "train"]
__version__ = "0.1.0"
