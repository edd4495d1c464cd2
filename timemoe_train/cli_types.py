"""Comma-separated values on a command line, as every command reads them: a bad item is argparse's usage error
(exit 2, the option named), not a traceback."""

from __future__ import annotations

import argparse


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
