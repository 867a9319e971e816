"""XLA's FLOP count of a jitted function, as the benchmarks report it (imported by them).

The count is of the HLO before optimisation, which is the same for every backend: the function
is lowered for the CPU, which gives a count where jax 0.11's GPU backend gives none, else for the
default device.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax


def xla_flops(fn: Any, *args: Any) -> float | None:
    """FLOPs of one call of `jax.jit(fn)` on arguments shaped as `args` (pytrees of arrays),
    counted by XLA; None where no backend gives a count."""
    placements = []
    with contextlib.suppress(Exception):  # no CPU backend (JAX_PLATFORMS without cpu)
        placements.append(jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
    placements.append(None)
    for placement in placements:

        def shape(x: Any, placement: Any = placement) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement)

        try:
            cost = jax.jit(fn).lower(*jax.tree.map(shape, args)).cost_analysis()
        except Exception:
            continue
        cost = cost[0] if isinstance(cost, list) else cost
        if cost and cost.get("flops", 0.0) > 0:
            return float(cost["flops"])
    return None
