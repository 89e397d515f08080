"""tritonmoe: Mixture-of-Experts serving on Triton Inference Server.

The repository's top-level folders are mapped into this namespace by pyproject.toml:
``backend/`` -> ``tritonmoe.backend``, ``loader/`` -> ``tritonmoe.loader``, ``router/`` -> ``tritonmoe.router``,
``tools/`` -> ``tritonmoe.tools``.
"""

__version__ = "0.1.0"
