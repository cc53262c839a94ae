"""Mask-update schedule: when updates happen and how much is dropped (cosine decay)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_update_step(step: jax.Array, delta_t: int, t_end: int) -> jax.Array:
    """True at steps delta_t, 2*delta_t, ... strictly before t_end."""
    step = jnp.asarray(step, jnp.int32)
    return (step > 0) & (step % delta_t == 0) & (step < t_end)


def drop_fraction(step: jax.Array, alpha: float, t_end: int) -> jax.Array:
    """d(t) = alpha / 2 * (1 + cos(pi * t / t_end)).

    >>> float(drop_fraction(0, 0.3, 100)), round(float(drop_fraction(50, 0.3, 100)), 6)
    (0.30000001192092896, 0.15)
    """
    t = jnp.asarray(step, jnp.float32)
    return alpha / 2.0 * (1.0 + jnp.cos(jnp.pi * t / t_end))
