"""softcon: the typed configuration, runtime settings, CLI and demo of the pipeline."""

from softcon import models  # noqa: F401  (sets torch's allocator options before anything imports torch)
