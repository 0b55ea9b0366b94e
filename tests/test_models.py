import pytest
import torch

from deconvnet.deconv import DeconvNet
from deconvnet.models import ArchConfig, build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    assert count(build_model("zfnet")) == 62_357_608
    assert count(build_model("zfnet-b")) == 107_627_624


@pytest.mark.parametrize("pool_style", ["ceil", "blog"])
@pytest.mark.parametrize("lrn", [True, False])
def test_zfnet_intermediate_shapes_at_224(pool_style, lrn):
    model = build_model("zfnet", pool_style=pool_style, lrn=lrn).eval()
    engine = DeconvNet(model)
    x = torch.randn(1, 3, 224, 224)
    expected = {"conv1": 110, "pool1": 55, "conv2": 26, "pool2": 13, "conv3": 13, "conv4": 13, "conv5": 13, "pool5": 6}
    for name, size in expected.items():
        assert engine.activations(x, name).shape[-2:] == (size, size), name
    assert model(x).shape == (1, 1000)


def test_blog_pooling_differs_from_ceil_pooling_in_windows_not_shapes():
    torch.manual_seed(0)
    ceil = build_model("zfnet", lrn=False).eval()
    blog = build_model("zfnet", lrn=False, pool_style="blog").eval()
    blog.load_state_dict(ceil.state_dict())
    x = torch.randn(1, 3, 224, 224)
    a, b = ceil(x), blog(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b)


def test_config_round_trip_and_overrides():
    cfg = build_model("zfnet", fc=(1024, 512), num_classes=10, lrn=False).config
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg
    model = build_model(cfg)
    assert model.classifier.fc7.out_features == 512 and model.classifier.fc8.out_features == 10
    assert not hasattr(model.features, "norm1")


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("lenet")


@pytest.mark.parametrize("arch", ["zfnet", "zfnet-b", "alexnet"])
@pytest.mark.parametrize("pool_style", ["ceil", "blog"])
def test_feature_shape_from_geometry_matches_a_forward_pass(arch, pool_style):
    """feature_shape() computes pool5's shape from the layers' geometry (no forward pass, see its
    docstring); it must give the forward pass's shape, and fail as it does where the input is too small.
    Built on the meta device: shapes only, no weights allocated."""
    with torch.device("meta"):
        for size in (224, 225, 231, 257, 96, 64, 40):
            try:
                model = build_model(arch, input_size=size, pool_style=pool_style)
            except RuntimeError:  # too small: the forward pass must fail too
                features = build_model(arch, pool_style=pool_style).features
                with pytest.raises(RuntimeError):
                    features(torch.zeros(1, 3, size, size))
                continue
            shape = tuple(model.features(torch.zeros(1, 3, size, size)).shape[1:])
            assert model.feature_shape() == shape, size
