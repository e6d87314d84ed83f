"""Adapters for the private or internal APIs of dependencies that the project relies on.

Every private (underscore) or internal API of a dependency that the project uses goes through one small module
here, one module per dependency (``odc_readers``, ``zarr_internals``, ``timm_dinov2``, ``timm_vit``,
``mlflow_monitor``, ``prefect_storage``, ``torch_internals``), and nowhere else: each module names the exact APIs
it wraps and the versions it was checked against, the dependency is pinned below its next breaking release in
``pyproject.toml`` (with a comment naming the module), and ``tests/test_compat.py`` exercises each adapter against
the installed version, so that an upgrade that changes such an API fails there, loudly and by name, rather than
somewhere deep in a run. The adapters sit in the bottom layer (they import nothing from ``softcon.flows``,
``softcon.tasks`` or ``softcon.models``), and this package imports none of them eagerly: each pulls in its
dependency only when it is imported.
"""
