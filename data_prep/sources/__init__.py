"""Input sources: each turns one kind of raw corpus into indexed datasets (see ``base``)."""

from data_prep.sources.base import DOMAINS, DatasetSpec, Discovery, Source
from data_prep.sources.embedded import EmbeddedSource
from data_prep.sources.hf_disk import HfDiskSource
from data_prep.sources.tabular import TableLayout, TableSource
from data_prep.sources.time300b import Time300BSource
from data_prep.sources.tsf import TsfSource

__all__ = [
    "DOMAINS",
    "DatasetSpec",
    "Discovery",
    "EmbeddedSource",
    "HfDiskSource",
    "Source",
    "TableLayout",
    "TableSource",
    "Time300BSource",
    "TsfSource",
]
