"""charlstm: a character-level recurrent text generator.

Train on your own text, generate more of it, and measure what the model learned. The public entry
points are `load` (a trained run, ready to generate and evaluate) and `train`; they are imported on
first use, so `import charlstm` (and the CLI's start-up) stays cheap.
"""

import os as _os

# The one thing done on import, because it must happen before PyTorch starts its OpenMP threads:
# threads that spin while they wait collapse when the cores are shared with any other process
# (a 1 x 384 LSTM step on this project's 2-core machine ran 3-5x slower with 2 spinning threads
# than with 1 while another job ran; with passive waiting, 2 threads were as fast as 1 thread).
# A user's own OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["RunConfig", "TextModel", "UserError", "load", "train"]
__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "charlstm.config",
    "TextModel": "charlstm.api",
    "UserError": "charlstm.errors",
    "load": "charlstm.api",
    "train": "charlstm.api",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'charlstm' has no attribute {name!r}")
