"""OpenAI-compatible /v1 route module: models. ``GET /v1/models`` lists every installed
model, loaded or not; ``GET /v1/models/{model}`` one of them (404 in OpenAI's shape when
there is none, which its clients raise as ``NotFoundError``)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from modelhost.api.deps import ModelNamePath, ServicesDep, require_api_key
from modelhost.api.openai.common import installed, openai_error_responses
from modelhost.store import Manifest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


class ModelObject(BaseModel):
    """One model as OpenAI describes it."""

    id: str = Field(description="the model's modelhost name: what `model` takes on /v1")
    object: Literal["model"] = "model"
    created: int = Field(description="when it was installed, in Unix seconds")
    owned_by: str = Field(description="the source it was installed from (huggingface, url...)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


def model_object(manifest: Manifest) -> ModelObject:
    """The OpenAI model object of an installed model."""
    created = int(manifest.downloaded_at.timestamp()) if manifest.downloaded_at else 0
    return ModelObject(id=manifest.name, created=created, owned_by=manifest.source)


@router.get(
    "/models",
    summary="OpenAI: list the installed models",
    response_model=ModelList,
    responses=openai_error_responses(),
)
async def list_models(services: ServicesDep) -> ModelList:
    manifests = await asyncio.to_thread(services.store.list)
    closing = services.lifecycle.is_closing
    return ModelList(data=[model_object(m) for m in manifests if not closing(m.name)])


@router.get(
    "/models/{model:path}",
    summary="OpenAI: one installed model",
    response_model=ModelObject,
    responses=openai_error_responses(400, 404),
)
async def retrieve_model(model: ModelNamePath, services: ServicesDep) -> ModelObject:
    return model_object(await installed(services, model))
