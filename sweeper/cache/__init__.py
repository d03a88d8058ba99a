"""The feature cache: the frozen backbone runs once per image, and trials read its features from Parquet.

``manifest`` plans what a cache holds (rows, synthetic RACP recipes, the key) on the driver; ``build`` runs the
backbone over it with Ray Data and publishes it atomically; ``reader`` is the on-storage format, its verification and
the reader trials use (no Ray, no backbone). The package imports none of them, so a trial that reads never loads the
builder's dependencies.

Usage (not run here: it needs a sweep config and its images)::

    python -m sweeper.cache --config search_spaces/quickstart.yaml [--rebuild] [--verify]
    manifest = sweeper.cache.reader.open_cache(sweeper.cache.build.build_cache(config).uri)
"""

__all__ = ["build", "manifest", "reader"]
