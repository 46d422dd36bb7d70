"""The two source rewrites the host shim needs (``csrc/host_shim/ek_shim.h``; tests only).

g++ cannot parse CUDA's launch syntax, and ``extern __shared__`` / ``__shared__`` arrays need
per-block storage. Everything else of a CUDA source compiles as it is against the shim
headers, so the rewrite touches only these three forms and keeps every line where it was
(compiler messages point at the original lines):

* ``kernel<T, K><<<grid, block, smem, stream>>>(a, b)`` ->
  ``::ekshim::launch(kernel<T, K>, ::ekshim::LaunchCfg(grid, block, smem, stream), a, b)``;
* ``extern __shared__ [__align__(n)] T name[];`` -> ``T* name = ::ekshim::dynamic_smem<T>();``;
* ``__shared__ [__align__(n)] T name[A][B];`` -> a reference to the block's storage for that
  declaration (aligned to ``max(n, alignof(T))``).
"""

from __future__ import annotations

import re

_IDENT = re.compile(r"[A-Za-z0-9_:]")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+((?:__align__\s*\(\s*\d+\s*\)\s*)?)([^;\[\]]*?)\s*\b(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"(?<![\w#])__shared__\s+((?:__align__\s*\(\s*\d+\s*\)\s*)?)([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*((?:\[[^\]\n;]+\]\s*)*);"
)


class RewriteError(ValueError):
    """A launch whose shape the rewrite does not understand (the message quotes the line)."""


def _line_of(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return f"line {text.count(chr(10), 0, pos) + 1}: {text[start:end if end >= 0 else None].strip()}"


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression ending at ``end``: ``[ns::]name[<template args>]``."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise RewriteError("unbalanced template arguments before <<<: " + _line_of(text, end))
    while i > 0 and _IDENT.match(text[i - 1]):
        i -= 1
    return i


def _matching_paren(text: str, open_pos: int) -> int:
    depth = 0
    for j in range(open_pos, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    raise RewriteError("unbalanced launch arguments: " + _line_of(text, open_pos))


def rewrite_launches(text: str) -> str:
    """Every ``kernel<<<cfg>>>(args)`` as an ``::ekshim::launch`` call (line numbers kept)."""
    out, pos = [], 0
    while True:
        lt = text.find("<<<", pos)
        if lt < 0:
            out.append(text[pos:])
            return "".join(out)
        start = _kernel_start(text, lt)
        kernel = text[start:lt].strip()
        if not kernel or not re.match(r"[A-Za-z_:]", kernel):
            raise RewriteError("no kernel name before <<<: " + _line_of(text, lt))
        gt = text.find(">>>", lt + 3)
        if gt < 0:
            raise RewriteError("<<< without >>>: " + _line_of(text, lt))
        cfg = text[lt + 3:gt]
        p = gt + 3
        while p < len(text) and text[p].isspace():
            p += 1
        if p >= len(text) or text[p] != "(":
            raise RewriteError("a launch without an argument list: " + _line_of(text, lt))
        close = _matching_paren(text, p)
        args = text[p + 1:close]
        between = text[gt + 3:p]  # whitespace (maybe newlines) kept
        sep = ", " if args.strip() else ""
        out.append(text[pos:start])
        out.append(f"::ekshim::launch({kernel}, ::ekshim::LaunchCfg({cfg}){between}{sep}{args})")
        pos = close + 1


def rewrite_shared(text: str) -> str:
    """``extern __shared__`` and block-static ``__shared__`` declarations as per-block storage."""
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group(2).strip()}* {m.group(3)} = ::ekshim::dynamic_smem<{m.group(2).strip()}>();", text)
    counter = [0]

    def static(m: re.Match) -> str:
        counter[0] += 1
        ty, name, dims = m.group(2).strip(), m.group(3), re.sub(r"\s+", "", m.group(4))
        site = f"ek_smem_site_{counter[0]}"
        full = f"{ty}{dims}"
        align = re.search(r"\d+", m.group(1))
        args = f"&{site}, {align.group(0)}" if align else f"&{site}"  # __align__(n) kept
        return (f"static char {site}; {ty} (&{name}){dims} = ::ekshim::static_smem<{full}>({args});"
                if dims else f"static char {site}; {ty}& {name} = ::ekshim::static_smem<{ty}>({args});")

    return _STATIC_SHARED.sub(static, text)


def rewrite(text: str, origin: str) -> str:
    """A CUDA source ready for g++ with the shim: both rewrites and a ``#line`` to ``origin``."""
    return f'#line 1 "{origin}"\n' + rewrite_shared(rewrite_launches(text))
