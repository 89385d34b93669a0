"""Hugging Face checkpoints in and out: the families, their tensor tables, and the converter.

``fsmoe convert`` (fsmoe.cli.convert) and ``fsmoe train --init-from`` use :mod:`.convert`; each
family's tensor table and config translation lives in its own module (``mixtral``, ``qwen3_moe``,
``deepseek_v3``); the rules' transforms are in :mod:`.mapping`.
"""
from __future__ import annotations

from fsmoe.models.hf import deepseek_v3, mixtral, qwen3_moe
from fsmoe.models.hf.family import ConversionError, Family

FAMILIES: dict[str, Family] = {f.name: f for f in (mixtral.FAMILY, qwen3_moe.FAMILY, deepseek_v3.FAMILY)}


def family_of(hf: dict, where: str = "config.json") -> Family:
    """The family of a ``config.json`` (by ``architectures``, else ``model_type``)."""
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if fam.architecture in archs or (not archs and hf.get("model_type") == fam.model_type):
            return fam
    found = archs[0] if archs else hf.get("model_type")
    raise ConversionError(f"{where}: architectures", found, "allowed values are "
                          f"{sorted(f.architecture for f in FAMILIES.values())} (an fsmoe run directory converts "
                          "with --to-hf)")


__all__ = ["FAMILIES", "ConversionError", "Family", "family_of"]
