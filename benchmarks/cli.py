"""argparse helpers shared by the benchmark command lines."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

__all__ = ["csv_list", "positive_int"]


def csv_list(kind: str, convert: Callable[[str], object] = str, choices: Sequence[str] | None = None):
    """An argparse ``type`` for a comma list: each item checked against ``choices`` and converted.

    Errors name the option (``--<kind>``) and the offending item.
    """

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"--{kind} needs at least one value")
        out = []
        for item in items:
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(f"--{kind}: {item!r} is not one of {', '.join(choices)}")
            try:
                value = convert(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{kind}: {item!r} is not a valid value") from None
            out.append(value)
        return out

    return parse


def positive_int(text: str) -> int:
    """An int >= 1 (``ValueError`` otherwise, which argparse reports)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value
