"""Checks of user-facing settings (the pipeline's and the AR model's sampling settings): errors name the argument,
the accepted range and the value (one validator, one wording)."""
from __future__ import annotations

import math
import numbers

import torch


def _type_name(value) -> str:
    return type(value).__name__


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in ``minimum..maximum`` (either bound optional); bools, floats and strings are refused
    (``2.7`` tokens or ``True`` steps are mistakes, not numbers to round)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if minimum is not None and maximum is not None:
        accepted = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
        accepted = f"an integer >= {minimum}"
    else:
        accepted = "an integer" if maximum is None else f"an integer <= {maximum}"
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
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if minimum is not None and maximum is not None:
        accepted = f"a finite number in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        accepted = f"a finite number {'>' if open_minimum else '>='} {minimum:g}"
    else:
        accepted = "a finite number" + ("" if maximum is None else f" <= {maximum:g}")
    hint = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {accepted}{hint}, got {value!r} ({_type_name(value)})")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and (value <= minimum if open_minimum else value < minimum)) \
            or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}{hint}, got {value}")
    return value


__all__ = ["check_float", "check_int"]
