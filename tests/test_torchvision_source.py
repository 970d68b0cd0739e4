"""The torchvision source: weights from the enum's file name via a mirror, verified by the
sha256 prefix in that name, loaded into the architecture, labels from the enum."""

# No "from __future__ import annotations": torchvision reads the weights annotation at run time.
import hashlib
import io
from functools import partial

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision", reason="needs modelhost[vision]")
from torchvision.models._api import Weights, WeightsEnum, register_model  # noqa: E402
from torchvision.transforms._presets import ImageClassification  # noqa: E402

CATEGORIES = ["cat", "dog", "teapot"]


class MhTinyNet(nn.Module):
    """A real (small) image classifier, registered with torchvision like its own models."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _weights_bytes() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(MhTinyNet().state_dict(), buffer)
    return buffer.getvalue()


WEIGHTS = _weights_bytes()
PREFIX = hashlib.sha256(WEIGHTS).hexdigest()[:8]
FILENAME = f"mh_tiny_net-{PREFIX}.pth"


class MhTinyNetWeights(WeightsEnum):
    IMAGENET_TOY = Weights(
        url=f"https://download.pytorch.org/models/{FILENAME}",
        transforms=partial(ImageClassification, crop_size=16, resize_size=18),
        meta={"categories": CATEGORIES},
    )
    DEFAULT = IMAGENET_TOY


if "mh_tiny_net" not in torchvision.models.list_models():

    @register_model()
    def mh_tiny_net(
        *,
        weights: MhTinyNetWeights | None = None,
        progress: bool = True,
        **kwargs,
    ) -> MhTinyNet:
        return MhTinyNet(**kwargs)


def request(**extra) -> dict:
    return {
        "source": "torchvision",
        "model_id": "mh_tiny_net:IMAGENET_TOY",
        "name": "tiny",
        "allow_pickle": True,
        **extra,
    }


def test_weights_from_the_mirror_verified_loaded_and_labelled(make_server, fileserver):
    fileserver.add(f"/models/{FILENAME}", WEIGHTS)
    server = make_server([], torchvision_mirror=fileserver.url("/models"), device="cpu")
    answer = server.client.post("/models/download", json=request())
    assert answer.status_code == 202, answer.text
    assert answer.json()["download_info"]["files"] == [FILENAME]
    status = server.wait_for(answer.json()["download_id"])
    assert status["status"] == "completed" and status["message"].endswith("loaded on cpu")
    info = server.client.get("/models/download/tiny/info").json()
    # Under the default pickle policy (convert) the verified .pth is installed as safetensors.
    [conversion] = info["conversions"]
    assert conversion["original_path"] == FILENAME
    assert conversion["original_sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    converted = FILENAME.rsplit(".", 1)[0] + ".safetensors"
    assert [f["path"] for f in info["files"]] == [converted]
    assert info["files"][0]["sha256"] == conversion["converted_sha256"]
    assert info["revision"] == "MhTinyNetWeights.IMAGENET_TOY"

    pixels = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(3))
    result = server.client.post(
        "/models/tiny/predict", json={"inputs": {"pixels": pixels.tolist()}}
    )
    assert result.status_code == 200, result.text
    model = MhTinyNet()
    model.load_state_dict(torch.load(io.BytesIO(WEIGHTS), weights_only=True))
    batch = MhTinyNetWeights.IMAGENET_TOY.transforms()(pixels.to(torch.uint8).permute(2, 0, 1))
    with torch.no_grad():
        probs = model.eval()(batch.unsqueeze(0)).softmax(-1)[0]
    expected = [CATEGORIES[i] for i in torch.argsort(probs, descending=True).tolist()]
    assert [p["label"] for p in result.json()["predictions"]] == expected


def test_wrong_hash_fails_verification(make_server, fileserver):
    fileserver.add(f"/models/{FILENAME}", WEIGHTS[:-1] + bytes([WEIGHTS[-1] ^ 1]))
    server = make_server([], torchvision_mirror=fileserver.url("/models"), device="cpu")
    status = server.wait_for(
        server.client.post("/models/download", json=request()).json()["download_id"]
    )
    assert status["status"] == "failed" and status["error"] == "Digest mismatch"
    assert f"does not start with {PREFIX}" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


@pytest.mark.parametrize(
    "body, code, fragment",
    [
        ({"model_id": "no_such_net"}, 404, "torchvision has no architecture 'no_such_net'"),
        ({"model_id": "mh_tiny_net:V9"}, 404, "has no weights 'V9'; it has: IMAGENET_TOY"),
        ({"model_id": "Bad Name"}, 400, "Invalid model_id"),
        ({"allow_pickle": False, "policy": "allow"}, 400, "weights_only=True"),
        ({"policy": "refuse"}, 400, "MODELHOST_PICKLE_POLICY=refuse"),
    ],
)
def test_bad_requests(make_server, fileserver, body, code, fragment):
    body = dict(body)
    policy = body.pop("policy", "convert")
    server = make_server(
        [], torchvision_mirror=fileserver.url("/models"), device="cpu", pickle_policy=policy
    )
    response = server.client.post("/models/download", json=request(**body))
    assert response.status_code == code, response.text
    assert fragment in response.json()["message"]
    assert fileserver.count() == 0
