"""A `--freq` given on a command line, checked before any work starts: a pandas offset alias, in the spelling of
the installed pandas or of the other side of pandas 2.2's renames (`H`/`h`, `T`/`min`, `M`/`ME`, ...), so that a
command copied from older docs, or written for a newer pandas, still runs. The value kept is pandas' own canonical
spelling (what prep writes for an inferred frequency, too)."""

from __future__ import annotations

import re
import warnings

import pandas as pd

# pandas 2.2 renamed these (the old spellings are refused from pandas 3); anchors (`Q-DEC`, `A-JAN`) carry over.
RENAMED = {"H": "h", "BH": "bh", "CBH": "cbh", "T": "min", "S": "s", "L": "ms", "U": "us", "N": "ns",
           "M": "ME", "BM": "BME", "CBM": "CBME", "SM": "SME", "Q": "QE", "BQ": "BQE", "Y": "YE", "BY": "BYE",
           "A": "YE", "BA": "BYE", "AS": "YS", "BAS": "BYS"}
ALIAS = re.compile(r"(?P<n>[+-]?\d*(?:\.\d+)?)(?P<name>[A-Za-z]+)(?P<anchor>-\w+)?")
EXAMPLES = "e.g. h, 15min, D, W-MON, MS, ME, QS, YS"


class FreqError(ValueError):
    """A frequency no pandas spelling reads; the message names the option and the value."""


def spellings(text: str) -> list[str]:
    """`text`, then its old or new name across pandas 2.2's renames."""
    m = ALIAS.fullmatch(text)
    if not m:
        return [text]
    renamed = RENAMED.get(m["name"]) or {new: old for old, new in RENAMED.items()}.get(m["name"])
    return [text] + ([f"{m['n']}{renamed}{m['anchor'] or ''}"] if renamed else [])


def canonical_freq(text: str | None, option: str = "--freq") -> str | None:
    """pandas' canonical spelling of `text` (None stays None: the frequency is inferred); FreqError otherwise."""
    if text is None:
        return None
    for spelling in spellings(text.strip()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # pandas 2.2-2.x: an old spelling, accepted
                offset = pd.tseries.frequencies.to_offset(spelling)
        except (ValueError, TypeError):
            continue
        if offset.n <= 0:
            raise FreqError(f"{option} {text!r}: must step forward in time ({EXAMPLES})")
        return offset.freqstr
    raise FreqError(f"{option} {text!r}: not a pandas frequency alias ({EXAMPLES})")
