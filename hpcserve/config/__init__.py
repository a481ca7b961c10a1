"""The deployment file (YAML): its schema, defaults and validation (schema.py), and reading a file
into a validated `Deployment` or a `ConfigError` naming the field and what was expected (loading.py)."""

from .loading import *  # noqa: F401,F403  (the one import path: hpcserve.config)
from .schema import *  # noqa: F401,F403
