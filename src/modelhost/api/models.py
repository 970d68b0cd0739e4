"""Model endpoints: configured and available models, the cache, management, removal."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from modelhost.api.deps import (
    ModelNamePath,
    ModelNameQuery,
    Services,
    ServicesDep,
    parse_choice,
    require_api_key,
)
from modelhost.api.errors import error_responses
from modelhost.api.inference import loaded_model
from modelhost.catalog import (
    available_view,
    entry_for_model_id,
    load_sizes,
    measure_sizes,
    models_view,
    save_sizes,
    speaks,
)
from modelhost.errors import InvalidRequest
from modelhost.names import validate_name
from modelhost.offloop import import_off_loop
from modelhost.sources import DownloadRequest, Plan
from modelhost.store import Manifest, describe
from modelhost.units import MB

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["models"])


def _tags_for(manifest: Manifest, services: Services) -> list[str]:
    entry = entry_for_model_id(services.catalog, manifest.model_id)
    return list(entry.tags) if entry else []


@router.get("/models", summary="Configured models (models.json)", responses=error_responses())
async def list_models(services: ServicesDep) -> dict:
    loaded = {model.name for model in services.runtime.list()}
    return models_view(services.models_config, loaded=loaded)


@router.get(
    "/models/available",
    summary="The catalog of downloadable models",
    responses=error_responses(400, 422),
)
async def available_models(
    services: ServicesDep,
    measure: bool = Query(
        default=False,
        include_in_schema=False,  # refused: measuring is POST /models/available/measure
    ),
) -> dict:
    if measure:
        # A GET never changes state: measuring calls every upstream and writes a file.
        raise InvalidRequest(
            "GET /models/available does not measure: measuring asks every upstream and keeps "
            "the result, so it is POST /models/available/measure",
            error="Use POST to measure",
            param="measure",
        )
    sizes = await asyncio.to_thread(load_sizes, services.settings.home)
    manifests = await asyncio.to_thread(services.store.list)
    return available_view(services.catalog, installed=manifests, sizes=sizes)


@router.post(
    "/models/available/measure",
    summary="Measure the catalog's download sizes, and keep them",
    description="Plans every entry's download request (the upstreams' file listings: "
    "metadata requests only, no weights move), sums what each install would transfer, keeps "
    "the result in the home (catalog-sizes.json) and answers the catalog with it, as "
    "`GET /models/available` reports it from then on.",
    responses=error_responses(422, 502),
)
async def measure_available_models(services: ServicesDep) -> dict:
    def plan(body: dict) -> Plan:
        return services.jobs.plan_only(DownloadRequest(**body))

    sizes = await asyncio.to_thread(measure_sizes, services.catalog, plan)
    await asyncio.to_thread(save_sizes, services.settings.home, sizes)
    manifests = await asyncio.to_thread(services.store.list)
    return available_view(services.catalog, installed=manifests, sizes=sizes)


@router.get(
    "/models/managed",
    summary="Models loaded by the server, measured",
    responses=error_responses(),
)
async def managed_models(services: ServicesDep) -> dict:
    closing = services.lifecycle.is_closing
    # A model being deleted is already gone for clients, though its memory is freed last.
    rows = [
        services.lifecycle.describe(model)
        for model in services.runtime.list()
        if not closing(model.name)
    ]
    tts = [row for row in rows if row["is_tts"]]
    return {
        "total_models": len(rows),
        "downloaded_models": rows,
        "categories": {
            "tts_models": [{"name": r["name"], "loaded": True, "is_tts": True} for r in tts],
            "other_models": [
                {"name": r["name"], "loaded": True, "is_tts": False}
                for r in rows
                if not r["is_tts"]
            ],
        },
        "summary": {
            "total_loaded": len(rows),
            "tts_models_count": len(tts),
            "optimized_count": sum(1 for r in rows if r["optimized"]),
            "total_parameters": sum(r["parameters"] for r in rows),
        },
    }


@router.get(
    "/models/cache/info", summary="What the cache holds, measured", responses=error_responses()
)
async def cache_info(services: ServicesDep) -> dict:
    store, jobs = services.store, services.jobs
    manifests = await asyncio.to_thread(store.list)
    total_bytes = await asyncio.to_thread(store.total_size)
    tts = [m for m in manifests if speaks(m)]
    tts_bytes = sum(m.total_size for m in tts)
    limit = services.settings.cache_limit_bytes
    partial_bytes = await asyncio.to_thread(jobs.engine.partial_bytes)
    disk = await asyncio.to_thread(shutil.disk_usage, store.root)
    return {
        "cache_directory": str(store.root),
        "total_models": len(manifests),
        "total_size_mb": round(total_bytes / MB, 3),
        "total_size_bytes": total_bytes,
        "models": [m.name for m in manifests],
        # Each installed model's row, and the disk the cache lives on (the dashboard's chart).
        "installed_models": [
            {
                "name": m.name,
                "source": m.source,
                "model_id": m.model_id,
                "revision": m.revision,
                "task": m.task,
                "size_bytes": m.total_size,
                "is_tts": speaks(m),
            }
            for m in manifests
        ],
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        # Bytes unfinished, failed and cancelled downloads hold in partial files (resumable;
        # DELETE /models/download/{name} of a failed download removes them).
        "partial_bytes": partial_bytes,
        "partial_mb": round(partial_bytes / MB, 3),
        "tts_specific": {
            "tts_models_count": len(tts),
            "tts_models": [
                {
                    "name": m.name,
                    "size_mb": round(m.total_size / MB, 3),
                    "source": m.source,
                    "task": m.task,
                    "tags": _tags_for(m, services),
                }
                for m in tts
            ],
            "tts_total_size_mb": round(tts_bytes / MB, 3),
            "tts_percentage": round(100 * tts_bytes / total_bytes, 1) if total_bytes else 0.0,
        },
        "cache_optimization": {
            "cache_hit_rate": jobs.cache_hit_rate(),
            "download_requests": jobs.download_requests,
            "cache_hits": jobs.cache_hits,
            "optimization_enabled": False,
            "auto_cleanup": limit is not None,
            "cache_limit_mb": None if limit is None else round(limit / MB, 3),
        },
        # The Hugging Face mirror under /hf (MODELHOST_MIRROR): what it served since start.
        "mirror": {
            "mode": services.settings.mirror,
            "requests": services.mirror_stats.total_requests,
            "bytes_served": services.mirror_stats.bytes_served,
            "hits": services.mirror_stats.hits,
            "misses": services.mirror_stats.misses,
            "hit_rate": services.mirror_stats.hit_rate(),
        },
    }


@router.get(
    "/models/download/{model_name}/info",
    summary="An installed model's manifest",
    responses=error_responses(400, 404, 422),
)
async def model_info(model_name: ModelNamePath, services: ServicesDep) -> dict:
    validate_name(model_name)
    manifest = await asyncio.to_thread(services.store.require, model_name)
    data = describe(manifest, services.store)
    data["total_size_bytes"] = manifest.total_size
    return {"success": True, **data}


def retry_how(force: bool, resumed_bytes: int) -> str:
    """How a retry starts, as measured before its job ran: from scratch (forced), from the
    bytes earlier attempts left, or from byte 0 when none of them can be resumed."""
    if force:
        return "from scratch: the partial files were discarded"
    if resumed_bytes:
        return f"resuming from {resumed_bytes} bytes already fetched"
    return "starting over from byte 0: no partial bytes of it to resume"


class ManageAction(str, Enum):
    optimize = "optimize"
    retry_download = "retry_download"
    update = "update"
    pin = "pin"
    unpin = "unpin"


@router.post(
    "/models/manage",
    summary="Retry a download, optimize, update, pin or unpin a model",
    responses=error_responses(400, 404, 409, 422, 424, 502, 507),
)
async def manage_model(
    services: ServicesDep,
    # Both required: no default (an ``= ...`` default on an Annotated parameter is the value
    # Ellipsis, which the schema showed as optional and validate_name then saw as a name).
    action: Annotated[
        str,
        Query(
            description="optimize, retry_download, update, pin (never evicted from memory nor "
            "from the cache, kept across restarts) or unpin",
            json_schema_extra={"enum": [a.value for a in ManageAction]},
        ),
    ],
    model_name: ModelNameQuery,
    force_redownload: bool = Query(default=False),
    compile: bool = Query(default=False, description="optimize: also try torch.compile (CUDA)"),
) -> dict:
    chosen = parse_choice(ManageAction, action, "action")
    validate_name(model_name)
    if chosen is ManageAction.retry_download:
        result = await services.jobs.retry(model_name, force_redownload)
        job = result.job
        assert job is not None
        return {
            "success": True,
            "message": f"Retrying download of '{model_name}', "
            + retry_how(force_redownload, result.resumed_bytes),
            "action": chosen.value,
            "model_name": model_name,
            "download_id": job.id,
            "status": job.state.value,
            "resumed_bytes": result.resumed_bytes,
        }
    if chosen is ManageAction.update:
        result = await services.jobs.update(model_name)
        if result.job is None:
            assert result.installed is not None
            return {
                "success": True,
                "message": f"Model '{model_name}' is up to date "
                f"(commit {result.installed.revision}); nothing was transferred",
                "action": chosen.value,
                "model_name": model_name,
                "status": "up_to_date",
                "revision": result.installed.revision,
            }
        assert result.plan is not None
        changes = dataclasses.asdict(result.plan.changes) if result.plan.changes else {}
        return {
            "success": True,
            "message": f"Updating '{model_name}' to commit {result.plan.revision}: "
            f"{len(changes.get('modified', []))} changed, {len(changes.get('added', []))} "
            f"added, {len(changes.get('removed', []))} removed file(s)",
            "action": chosen.value,
            "model_name": model_name,
            "download_id": result.job.id,
            "status": result.job.state.value,
            "changes": changes,
        }
    if chosen in (ManageAction.pin, ManageAction.unpin):
        return await _pin(services, model_name, chosen is ManageAction.pin)
    return await _optimize(services, model_name, compile)


async def _pin(services: Services, model_name: str, pinned: bool) -> dict:
    """Pin or unpin: one meaning for memory and disk, kept in the manifest."""
    manifest = await asyncio.to_thread(services.lifecycle.pin, model_name, pinned)
    loaded = services.runtime.is_loaded(model_name)
    what = "pinned: never evicted from memory or from the cache" if pinned else "unpinned"
    return {
        "success": True,
        "message": f"Model '{model_name}' {what}",
        "action": "pin" if pinned else "unpin",
        "model_name": model_name,
        "pinned": manifest.pinned,
        "loaded": loaded,
    }


async def _optimize(services: Services, model_name: str, compile: bool) -> dict:
    """Optimize as an operation holding the model in use: a delete or unload that comes
    meanwhile waits for it; ``/models/managed`` shows ``operation: "optimizing"``."""
    # torch behind it: imported in a thread, never on the loop.
    optimize = (await import_off_loop("modelhost.runtime.optimize")).optimize
    await asyncio.to_thread(services.store.require, model_name)
    # Loaded on demand like any request that runs the model (409 when that is off).
    async with loaded_model(services, model_name, operation="optimizing") as loaded:
        report = await asyncio.to_thread(optimize, loaded, compile)
    return {
        "success": report.applied,
        "message": report.message,
        "action": ManageAction.optimize.value,
        "model_name": model_name,
        **report.to_dict(),
    }


@router.delete(
    "/models/download/{model_name}",
    summary="Remove a model from the cache",
    responses=error_responses(400, 404, 409, 422),
)
async def remove_model(model_name: ModelNamePath, services: ServicesDep) -> dict:
    validate_name(model_name)
    # Gone everywhere: requests and loads refused, its download cancelled, unloaded once its
    # requests in flight (or an optimize) end, then its files deleted.
    removal = await services.jobs.remove_model(model_name)
    unloaded = removal.unloaded
    cancelled = removal.cancelled
    if removal.manifest is not None:
        message = f"Successfully removed model from cache: {model_name}"
    elif cancelled is not None:
        message = f"Cancelled the download of {model_name}; nothing was installed yet"
    else:
        message = (
            f"{model_name} was not installed; removed the partial bytes its failed or "
            "cancelled download(s) left"
        )
    if removal.partial_bytes:
        message += f" ({removal.partial_bytes} partial bytes removed)"
    elif removal.manifest is None and cancelled is None:
        message += " (0 partial bytes were left)"
    return {
        "success": True,
        "message": message,
        "model_name": model_name,
        "freed_mb": round(removal.freed / MB, 3),
        "partial_bytes_removed": removal.partial_bytes,
        "cancelled_download_id": cancelled.id if cancelled else None,
        "unloaded": unloaded.to_dict() if unloaded else None,
    }
