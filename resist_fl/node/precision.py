"""What a node (or the server's evaluation) computes in: bf16 autocast or fp32, from ``amp``.

``amp = "auto"`` (the default) turns bf16 autocast on where the device computes bf16 natively: a
CUDA GPU that supports bf16 (Ampere or newer), or a CPU with AVX512-BF16 or AMX (PyTorch's own
CPU-capability probes). Elsewhere, bf16 would be emulated and slower, so the device stays in fp32.
``amp = true`` forces bf16 autocast, ``amp = false`` forces fp32.

Why ``auto`` is the default (issue 33): on a CPU with AVX512-BF16 a step of the study's model
takes less time in bf16 than in fp32, more so the wider the model
(``benchmarks/precision_benchmark.py``, measured in ``docs/performance/precision_benchmark.json``),
and the Fashion-MNIST study's ``amp`` ablation (bf16 against the fp32 main runs, paired by seed)
found no accuracy loss for ResIST or FedAvg (``docs/results/fmnist-study/report.md``). Under
``dp='local'`` ``auto`` means fp32: Opacus' per-sample steps run in fp32
(:meth:`resist_fl.run.settings.RunSettings.amp_wanted`).
"""

from __future__ import annotations

import torch

Amp = bool | str
"""The ``amp`` setting: ``"auto"``, ``True`` (bf16 autocast) or ``False`` (fp32)."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (then autocast pays rather than costs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe is not None and probe() for probe in probes)
    return False


def uses_bf16(amp: Amp, device: torch.device) -> bool:
    """Whether to compute in bf16 autocast on ``device`` under the ``amp`` setting."""
    return native_bf16(device) if amp == "auto" else bool(amp)


PRECISIONS = {0: "fp32", 1: "bf16 autocast"}
"""A training reply's ``bf16`` metric, as ``nodes.jsonl``'s ``precision`` names it."""


def precision(bf16: bool) -> str:
    """What a device computes in, as the logs and ``nodes.jsonl`` name it."""
    return PRECISIONS[int(bool(bf16))]


def explain(amp: Amp, device: torch.device | None, local_dp: bool = False) -> str:
    """One phrase for the start-up logs: the precision on ``device`` and why (``amp`` as the user set
    it; under ``auto`` whether the device has native bf16; ``local_dp``: Opacus' steps are fp32).
    ``device=None``: the nodes' devices, which the server does not know (each node decides ``auto``)."""
    if local_dp:
        return "fp32 (dp='local': Opacus' per-sample steps run in fp32)"
    if amp != "auto":
        return f"{precision(bool(amp))} (amp={str(amp).lower()})"
    if device is None:
        return "bf16 autocast where their device has native bf16, else fp32 (amp='auto'; amp=false to force fp32)"
    has = "has" if native_bf16(device) else "has no"
    return (f"{precision(native_bf16(device))} (amp='auto': this {device.type.upper()} {has} native bf16; "
            "amp=true / amp=false to force)")
