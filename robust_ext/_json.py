"""Strict JSON for the reports and logs: non-finite floats become the strings "inf", "-inf" and "nan"."""
import json
import math

import torch

NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode(value):
    """``value`` with every non-finite float as the string "inf", "-inf" or "nan", so that it is strict JSON, and
    a torch dtype (an attack's ``amp``) as its name, e.g. "torch.bfloat16"."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def dumps(value, indent=None, **kwargs) -> str:
    """``value`` as strict JSON text (see :func:`encode`); ``kwargs`` go to :func:`json.dumps`."""
    return json.dumps(encode(value), indent=indent, allow_nan=False, **kwargs)


def decode(value):
    """Inverse of :func:`encode`."""
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value
