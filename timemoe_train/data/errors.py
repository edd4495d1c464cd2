"""The loader's exception for bad input: timemoe-prep's, so one `except PrepError` covers the corpus end to end.

The message names the file, the field and the value.
"""

from __future__ import annotations

from data_prep.errors import PrepError


class DataError(PrepError, ValueError):
    pass
