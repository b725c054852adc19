"""Checks of user-facing settings (the pipeline's and the AR model's sampling settings): errors name the argument,
the accepted range and the value (one validator, one wording)."""
from __future__ import annotations

import math
import numbers

import torch


def _type_name(value) -> str:
    return type(value).__name__


def _accepted(kind: str, minimum, maximum, open_minimum: bool = False, integer: bool = False) -> str:
    """The accepted values in words: 'an integer in 1..12', 'a finite number in (0, 1]', '... >= 0'."""
    show = str if integer else (lambda v: f"{v:g}")
    if minimum is not None and maximum is not None:
        span = (f"{minimum}..{maximum}" if integer else
                f"{'(' if open_minimum else '['}{show(minimum)}, {show(maximum)}]")
        return f"{kind} in {span}"
    if minimum is not None:
        return f"{kind} {'>' if open_minimum else '>='} {show(minimum)}"
    return kind if maximum is None else f"{kind} <= {show(maximum)}"


def _scalar(value):
    """A one-element tensor as a Python number (a bool tensor stays a tensor, so it is refused as one)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return value.item()
    return value


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in ``minimum..maximum`` (either bound optional); bools, floats and strings are refused
    (``2.7`` tokens or ``True`` steps are mistakes, not numbers to round)."""
    value = _scalar(value)
    accepted = _accepted("an integer", minimum, maximum, integer=True)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {accepted}, got {value!r} ({_type_name(value)})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                open_minimum: bool = False, hint: str = "") -> float:
    """``value`` as a finite float in ``[minimum, maximum]`` (``(minimum, ...`` with ``open_minimum``); NaN,
    inf, bools and non-numbers are refused. ``hint`` is appended to the message (what the values mean)."""
    value = _scalar(value)
    accepted = _accepted("a finite number", minimum, maximum, open_minimum) + (f" ({hint})" if hint else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {accepted}, got {value!r} ({_type_name(value)})")
    value = float(value)
    below = minimum is not None and (value <= minimum if open_minimum else value < minimum)
    if not math.isfinite(value) or below or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


__all__ = ["check_float", "check_int"]
