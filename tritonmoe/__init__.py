"""tritonmoe: Mixture-of-Experts serving on Triton Inference Server.

The repository's top-level folders are mapped into this namespace by pyproject.toml:
``backend/`` -> ``tritonmoe.backend``, ``loader/`` -> ``tritonmoe.loader``, ``router/`` -> ``tritonmoe.router``,
``tools/`` -> ``tritonmoe.tools``.
"""

__version__ = "0.1.0"

# Run from a source checkout without installing (the GPU machine, a quick PYTHONPATH=. session): the subpackages
# live in the checkout's top-level folders, so look for them there too. An installed copy has no pyproject beside.
import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _checkout not in __path__:
    __path__.append(_checkout)
del _os, _checkout
