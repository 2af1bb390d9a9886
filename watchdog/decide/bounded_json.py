"""JSON read from places anyone with write access can fill: the state annotation, Harvester's
Setting. Refused, with a reason, when it is too long, nested too deeply, or holds NaN or
Infinity; never a RecursionError or a float that is not a number.

Owns: `loads` and its limits. Must not: know what the document means (its callers do).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 16  # ours nest three levels; Harvester's policy one


class JsonRefused(ValueError):
    """The text is not a bounded, finite JSON document; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a number")


def loads(text: str | bytes, *, max_bytes: int, what: str) -> Any:
    """The document in `text`, or JsonRefused naming `what` and the problem."""
    size = len(text.encode()) if isinstance(text, str) else len(text)
    if size > max_bytes:
        raise JsonRefused(f"{what} is {size} bytes, more than {max_bytes}")
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except JsonRefused as e:
        raise JsonRefused(f"{what}: {e}") from None
    except RecursionError:
        raise JsonRefused(f"{what} is nested more than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise JsonRefused(f"{what} is not JSON ({e.msg} at char {e.pos})") from None
    except (ValueError, UnicodeDecodeError) as e:  # e.g. an integer of more than 4300 digits
        raise JsonRefused(f"{what} is not JSON ({str(e)[:80]})") from None
    if _depth(doc) > MAX_DEPTH:
        raise JsonRefused(f"{what} is nested more than {MAX_DEPTH} levels")
    if _has_non_finite(doc):
        raise JsonRefused(f"{what} holds a number out of range")
    return doc


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list):
        return node
    return []


def _depth(doc: Any) -> int:
    deepest, level = 0, [doc]
    while level:
        level = [c for n in level for c in _children(n) if isinstance(c, dict | list)]
        deepest += 1
        if deepest > MAX_DEPTH:
            break
    return deepest


def _has_non_finite(doc: Any) -> bool:
    # 1e999 parses as inf without passing through parse_constant.
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return True
        stack.extend(_children(node))
    return False
