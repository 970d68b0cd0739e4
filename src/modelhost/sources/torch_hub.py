"""The ``pytorch_hub`` source: a GitHub repository's snapshot with a ``hubconf.py``.

``model_id`` is ``owner/repo:ref/entrypoint`` (``pytorch/vision:v0.17.0/resnet18``). Loading
runs the repository's ``hubconf.py``, so only repositories listed in
``MODELHOST_TORCH_HUB_ALLOW`` are accepted, always pinned to the ``ref`` given. The archive
comes through the fetch engine (from codeload.github.com, or ``MODELHOST_TORCH_HUB_MIRROR``)
and is extracted safely when the job runs.
"""

from __future__ import annotations

import re

from modelhost.errors import InvalidRequest, SourceNotAllowed
from modelhost.fetch import FileSpec
from modelhost.sources.base import DownloadRequest, Plan, SourceContext
from modelhost.spec import ModelSpec

MODEL_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99})"
    r":(?P<ref>[A-Za-z0-9][A-Za-z0-9._-]{0,99})/(?P<entry>[A-Za-z_][A-Za-z0-9_]{0,99})$"
)
CODELOAD = "https://codeload.github.com"


class TorchHubSource:
    name = "pytorch_hub"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """Check the repository against the allow-list and plan its archive at ``ref``."""
        match = MODEL_ID.fullmatch(request.model_id)
        if not match:
            raise InvalidRequest(
                f"Invalid model_id {request.model_id!r}: use owner/repo:ref/entrypoint, e.g. "
                "'pytorch/vision:v0.17.0/resnet18' (the ref pins the code that will run)",
                error="Invalid model id",
            )
        repo, ref, entrypoint = match["repo"], match["ref"], match["entry"]
        if repo.lower() not in {r.lower() for r in context.torch_hub_allow}:
            raise SourceNotAllowed(
                f"{repo} is not in MODELHOST_TORCH_HUB_ALLOW: loading a hub model runs the "
                "repository's hubconf.py, so only listed repositories are accepted",
                error="Repository not allowed",
            )
        base = (context.mirrors.get(self.name) or CODELOAD).rstrip("/")
        url = f"{base}/{repo}/zip/{ref}"
        archive = f"{repo.split('/')[1]}-{ref}.zip"
        spec = FileSpec(url=url, path=archive, size=context.engine.probe(url, context.cancel).size)
        return Plan(
            source=self.name,
            model_id=request.model_id,
            task=None,
            files=[spec],
            revision=ref,
            spec=ModelSpec(
                model_type="torch_hub",
                description=f"{entrypoint} from {repo} at {ref}",
                load_as=f"torch_hub:{entrypoint}",
                repo=repo,
            ),
            archive="zip",
        )
