"""timemoe-prep: pack Time-300B and other corpora into sharded Arrow files with a manifest.

Python use (what ``make demo`` does)::

    from data_prep import PrepOptions, prepare
    from data_prep.sources import EmbeddedSource
    manifest = prepare(EmbeddedSource(), "runs/data", PrepOptions(workers=2))

Readers: ``data_prep.corpus_manifest`` (``load_manifest``, ``SCHEMA_VERSION``, ``shard_paths``, ``verify_shards``) and
``data_prep.shards`` (``SCHEMA``, ``read_shard``).
"""

from data_prep.clean import CleanOptions
from data_prep.errors import PrepError
from data_prep.corpus_manifest import SCHEMA_VERSION, load_manifest, shard_paths, verify_shards
from data_prep.pipeline import PrepOptions, prepare
from data_prep.shards import SCHEMA, read_shard

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "CleanOptions",
    "PrepError",
    "PrepOptions",
    "load_manifest",
    "prepare",
    "read_shard",
    "shard_paths",
    "verify_shards",
]
