"""Randomness that a privacy guarantee rests on: drawn from the operating system's entropy pool.

Differential privacy holds only if the party it protects against cannot reproduce the noise (or a
secret sample). Every generator a guarantee rests on is seeded here from fresh OS entropy
(:func:`secrets.randbits`, i.e. ``/dev/urandom``), never from the run seed, the round, a partition
id or a global RNG that the run re-seeds: nothing the server knows, writes or sends determines it.
Everything else in a run (initialisation, data order, augmentation, block dealing) stays seeded
and reproducible.
"""

from __future__ import annotations

import secrets

import numpy as np

ENTROPY_BITS = 128


def os_entropy() -> int:
    """A fresh ``ENTROPY_BITS``-bit integer from the operating system's entropy pool."""
    return secrets.randbits(ENTROPY_BITS)


def secure_numpy_generator() -> np.random.Generator:
    """A NumPy generator (PCG64) seeded from 128 bits of OS entropy."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(os_entropy())))


def secure_torch_generator(device="cpu"):
    """A torch generator on ``device`` seeded from 63 bits of OS entropy (torch seeds are 64-bit)."""
    import torch  # torch only where a node trains privately

    return torch.Generator(device=device).manual_seed(secrets.randbits(63))
