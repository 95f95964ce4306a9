"""Every architecture in the registry: the forward_features / forward_head split and standardization."""

import pytest
import torch

from noisewise.models.nets import NETS, arch_name, build_net, default_arch, pick_device

SHAPES = {"mlp": (1, 8, 8), "cnn": (3, 16, 16), "resnet18": (3, 32, 32)}
FEATURE_DIMS = {"mlp": 512, "cnn": 128, "resnet18": 512}


@pytest.mark.parametrize("arch", sorted(NETS))
def test_features_then_head_equals_forward(arch):
    torch.manual_seed(0)
    net = build_net(arch, SHAPES[arch], num_classes=7).eval()
    x = torch.rand(4, *SHAPES[arch])
    features = net.forward_features(x)
    assert features.shape == (4, FEATURE_DIMS[arch]) == (4, net.feature_dim)
    logits = net.forward_head(features)
    assert logits.shape == (4, 7)
    assert torch.allclose(net(x), logits)
    assert isinstance(net.head, torch.nn.Linear) and arch_name(net) == arch


@pytest.mark.parametrize("arch", sorted(NETS))
def test_batch_invariance_in_eval_mode(arch):
    torch.manual_seed(0)
    net = build_net(arch, SHAPES[arch], num_classes=3).eval()
    x = torch.rand(5, *SHAPES[arch])
    one_by_one = torch.cat([net(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(net(x), one_by_one, atol=1e-5)


def test_standardization_is_fitted_per_channel_and_saved_in_state_dict():
    net = build_net("cnn", (3, 8, 8), 2)
    x = torch.rand(100, 3, 8, 8) * torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    net.fit_standardization(x)
    z = net.standardize(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert {"input_mean", "input_std"} <= set(net.state_dict())


def test_vector_inputs_and_auto_arch():
    assert default_arch((20,)) == "mlp" and default_arch((1, 28, 28)) == "mlp" and default_arch((3, 32, 32)) == "cnn"
    net = build_net("auto", (20,), 4)
    assert net(torch.rand(3, 20)).shape == (3, 4)


def test_bad_arch_and_shape_are_explained():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_net("vgg", (1, 8, 8), 2)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_net("resnet18", (20,), 2)


def test_device_selection():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")
