"""Every hook a bitsweep plugin can implement. Built-in features use exactly these.

Each hook returns a list of objects; each object has a unique ``name`` that
becomes its public name in sweeps, the API and ``bitsweep plugins``.
"""

from bitsweep import hookspec


@hookspec
def register_schemes():
    """Return quantization schemes (``bitsweep.Scheme`` instances) to add."""


@hookspec
def register_model_sources():
    """Return model sources (objects with ``name`` and ``load``) to add."""


@hookspec
def register_datasets():
    """Return datasets (objects with ``name`` and ``load``) to add."""


@hookspec
def register_compressors():
    """Return file compressors (``bitsweep.Compressor`` instances) to add."""


@hookspec
def register_recipes():
    """Return data-free quantization recipes (``bitsweep.Recipe`` instances) to add."""
