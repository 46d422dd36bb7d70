"""What the audit keeps of one compiled kernel (either backend), as JSON-able data."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, fields
from typing import Optional

from . import sass as sass_mod


def stats_to_json(st: Optional[sass_mod.CodeStats]) -> Optional[dict]:
    """A :class:`~.sass.CodeStats` as a dict (Counter keys as strings)."""
    if st is None:
        return None
    # not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs
    return {f.name: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
            for f in fields(st) for v in (getattr(st, f.name),)}


def stats_from_json(d: Optional[dict]) -> Optional[sass_mod.CodeStats]:
    """Inverse of :func:`stats_to_json`."""
    if d is None:
        return None
    kw = dict(d)
    for name in ("ldg", "stg", "lds", "sts"):
        kw[name] = Counter({int(a): b for a, b in d[name].items()})
    for name in ("atom", "red", "ordering"):
        kw[name] = Counter(d[name])
    return sass_mod.CodeStats(**kw)


def code_record(name: str, resources: Optional[sass_mod.Resources], sass_text: Optional[str], ptx_text: Optional[str],
                notes: list[str]) -> dict:
    """The record of one kernel: resources (ptxas -v), SASS stats (PTX stats when SASS is missing), notes."""
    stats = sass_mod.sass_stats(sass_text) if sass_text else (sass_mod.ptx_stats(ptx_text) if ptx_text else None)
    if sass_text is None:
        notes = notes + ["no SASS (cuobjdump missing or failed): instruction counts are from PTX" if ptx_text
                         else "no SASS and no PTX: instruction counts unknown"]
    return {"name": name, "resources": asdict(resources) if resources else None, "stats": stats_to_json(stats),
            "notes": notes}
