"""Model families: which adapter a model gets, decided from its manifest and config.json.

Each family is one module of this package implementing ``base.FamilyAdapter`` (detect,
estimate memory, load, predict and/or synthesize, the probe ``optimize`` measures, batching);
``registry`` lists them, one line each, imported on first use. ``vocabulary`` holds the
shared names (``Family``, ``FamilyInfo``, task aliases) and ``detect`` holds
``detect_family``.

This module only re-exports those names for code outside modelhost (a family of one's own
imports ``FamilyInfo`` from here, see docs/families.md). No module of this package imports
it, and modelhost's own modules import from the submodules. Python runs it before any
submodule: it imports ``vocabulary`` and ``detect`` (with ``base`` and ``registry``), none of
which imports torch or an adapter.
"""

from __future__ import annotations

from modelhost.runtime.families.detect import detect_family
from modelhost.runtime.families.vocabulary import (
    SUPPORTED,
    TASK_ALIASES,
    TTS_FAMILIES,
    Family,
    FamilyInfo,
    canonical_task,
    check_loadable,
    family_name,
    has_suffix,
    read_config,
    task_from_architectures,
    vocoder_path,
)

__all__ = [
    "SUPPORTED",
    "TASK_ALIASES",
    "TTS_FAMILIES",
    "Family",
    "FamilyInfo",
    "canonical_task",
    "check_loadable",
    "detect_family",
    "family_name",
    "has_suffix",
    "read_config",
    "task_from_architectures",
    "vocoder_path",
]
