import pytest
import torch
from sklearn.datasets import load_sample_images
from torchvision.models import ResNet18_Weights

from transfer_learning.data.loading import EvalTransform, Normaliser
from transfer_learning.models.backbones import (
    BackboneError,
    BackboneSettings,
    auto_image_size,
    build_backbone,
    resolve_image_size,
)

IMAGENET = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def imagenet_top5(backbone) -> list[list[str]]:
    """ImageNet top-5 of the full network on scikit-learn's china.jpg and flower.jpg."""
    transform, normalise = EvalTransform(backbone.preprocessing), Normaliser(backbone.preprocessing)
    photos = [
        transform(torch.from_numpy(p.copy()).permute(2, 0, 1)) for p in load_sample_images().images
    ]
    with torch.inference_mode():
        logits = backbone.full_network()(normalise(torch.stack(photos)))
    return [[IMAGENET[i] for i in row] for row in logits.topk(5).indices.tolist()]


def test_default_weights_are_real_imagenet_weights():
    china, flower = imagenet_top5(build_backbone(BackboneSettings(image_size=None)))
    assert "palace" in china
    assert "daisy" in flower


def test_random_initialisation_does_not_recognise_the_photos():
    torch.manual_seed(0)
    china, flower = imagenet_top5(
        build_backbone(BackboneSettings(image_size=None, pretrained=False))
    )
    assert "palace" not in china and "daisy" not in flower


def test_backbone_reports_its_preprocessing_and_width():
    backbone = build_backbone(BackboneSettings(image_size=64))
    assert backbone.feature_dim == 1280
    assert backbone.preprocessing.image_size == 64
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    with torch.inference_mode():
        assert backbone.features(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)


def test_torchvision_family_without_download():
    backbone = build_backbone(
        BackboneSettings(name="torchvision/resnet18", image_size=None, pretrained=False)
    )
    assert backbone.feature_dim == 512
    assert backbone.preprocessing.image_size == 224
    with torch.inference_mode():
        assert backbone.features(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
        assert backbone.full_network()(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_local_weights_file_round_trips(tmp_path):
    torch.manual_seed(3)
    source = build_backbone(
        BackboneSettings(name="torchvision/resnet18", image_size=None, pretrained=False)
    )
    from torchvision.models import resnet18

    reference = resnet18()
    reference.load_state_dict(
        {
            **source.features.state_dict(),
            **{f"fc.{k}": v for k, v in source.classifier.fc.state_dict().items()},
        }
    )
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    loaded = build_backbone(
        BackboneSettings(name="torchvision/resnet18", image_size=None, weights_path=str(path))
    )
    x = torch.randn(1, 3, 32, 32)
    # The project's modules around the weights vs torchvision's own forward: float32 kernels
    # that may run in another order; torch.allclose's rtol 1e-5 with a float32 atol.
    with torch.inference_mode():
        assert torch.allclose(loaded.full_network()(x), reference.eval()(x), atol=1e-5)


def test_weights_of_another_architecture_name_the_first_mismatch(tmp_path):
    from torchvision.models import resnet18

    other = resnet18(num_classes=10)
    path = tmp_path / "ten_classes.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(BackboneError, match=r"tensor 'fc.weight' has shape \(10, 512\)"):
        build_backbone(
            BackboneSettings(name="torchvision/resnet18", image_size=None, weights_path=str(path))
        )


def test_missing_weights_file():
    with pytest.raises(BackboneError, match="backbone.weights_path='/nope.pt' does not exist"):
        build_backbone(BackboneSettings(weights_path="/nope.pt"))


def test_unknown_backbone_name():
    with pytest.raises(BackboneError, match="backbone.name='vgg_lite' is unknown"):
        build_backbone(BackboneSettings(name="vgg_lite"))


def test_offline_download_names_the_offline_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(BackboneError, match="Offline choices: backbone.name=efficientnet_lite0"):
        build_backbone(BackboneSettings(name="torchvision/resnet18"))


@pytest.mark.parametrize(
    "short_side,expected",
    [
        (8, 48),  # digits: 4x would be 32; never below 48
        (20, 80),  # 4x
        (32, 128),  # CIFAR: 4x
        (50, 208),  # 4x, rounded up to a multiple of 16
        (100, 224),  # 4x would pass the native size
        (375, 224),  # photos: the native size
        (None, 224),  # nothing known: the native size
    ],
)
def test_auto_image_size(short_side, expected):
    assert auto_image_size(224, short_side) == expected


def test_auto_resolves_against_the_networks_own_size():
    resolved = resolve_image_size(BackboneSettings(name="torchvision/resnet18"), 300)
    assert resolved.image_size == 224 and resolved.name == "torchvision/resnet18"
    assert resolve_image_size(BackboneSettings(image_size=96), 8).image_size == 96
    assert resolve_image_size(BackboneSettings(image_size=None), 8).image_size == 224
    with pytest.raises(BackboneError, match="resolve it from the data first"):
        build_backbone(BackboneSettings(image_size="auto"))
    with pytest.raises(BackboneError, match="backbone.image_size='big' must be 'auto'"):
        BackboneSettings.from_params({"image_size": "big"})


def photo_crops() -> list[torch.Tensor]:
    """Nine square crops (3 scales x left/centre/right) of each bundled sample photo
    (china.jpg first)."""
    crops = []
    for photo in load_sample_images().images:
        image = torch.from_numpy(photo.copy()).permute(2, 0, 1)
        height, width = image.shape[-2:]
        for scale in (1.0, 0.7, 0.5):
            side = int(height * scale)
            for across in (0.0, 0.5, 1.0):
                left = int((width - side) * across)
                crops.append(image[:, (height - side) // 2 :, left : left + side][:, :side])
    return crops


@pytest.mark.parametrize(
    ("name", "native"), [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]
)
@pytest.mark.parametrize("pretrained", [True, False])
def test_larger_lite_weights_are_real_imagenet_weights(name, native, pretrained):
    """The Lite1/Lite2 files map by position onto timm's tensors; proven on a real photo: most
    crops of china.jpg are a palace for the real weights, none for random ones."""
    backbone = build_backbone(BackboneSettings(name=name, image_size=None, pretrained=pretrained))
    assert backbone.preprocessing.image_size == native
    transform, normalise = EvalTransform(backbone.preprocessing), Normaliser(backbone.preprocessing)
    china = torch.stack([transform(crop) for crop in photo_crops()[:9]])
    with torch.inference_mode():
        top1 = backbone.full_network()(normalise(china)).argmax(1).tolist()
    palaces = sum(IMAGENET[i] == "palace" for i in top1)
    assert palaces >= 5 if pretrained else palaces == 0
