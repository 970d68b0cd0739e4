"""The packaged catalog of downloadable models and the configured-models file (models.json)."""

from modelhost.catalog.catalog import (
    STT_TASKS,
    TTS_TASKS,
    Catalog,
    CatalogEntry,
    ModelConfigEntry,
    ModelsConfig,
    Recommendations,
    TTSFeatures,
    available_view,
    catalog_entry,
    entry_for_model_id,
    is_tts_task,
    load_catalog,
    load_models_config,
    models_view,
    speaks,
)
from modelhost.catalog.sizes import SizeMeasurement, load_sizes, measure_sizes, save_sizes

__all__ = [
    "STT_TASKS",
    "TTS_TASKS",
    "Catalog",
    "CatalogEntry",
    "ModelConfigEntry",
    "ModelsConfig",
    "Recommendations",
    "TTSFeatures",
    "available_view",
    "catalog_entry",
    "entry_for_model_id",
    "is_tts_task",
    "load_catalog",
    "load_models_config",
    "models_view",
    "speaks",
    "SizeMeasurement",
    "load_sizes",
    "measure_sizes",
    "save_sizes",
]
