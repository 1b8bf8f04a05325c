import pytest
import torch

from mnist_tracking.core.model import ACTIVATIONS, FEATURE_DIM, ConvNet


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_shapes_for_every_activation(activation):
    model = ConvNet(activation).eval()
    x = torch.rand(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
    assert model.features(x).shape == (4, FEATURE_DIM)
    assert isinstance(model.act5, ACTIVATIONS[activation])


def test_architecture_matches_the_seed():
    model = ConvNet()
    assert model.fc1.in_features == 64 * 7 * 7 == 3136
    assert [m.out_channels for m in (model.conv1, model.conv2, model.conv3, model.conv4)] == [32, 32, 64, 64]
    assert model.fc2.out_features == 10
    n_params = sum(p.numel() for p in model.parameters())
    # convs 320 + 9,248 + 18,496 + 36,928; batch norms 64+64+128+128+1,024; fc1 1,606,144; fc2 5,130
    assert n_params == 1_677_674


def test_features_are_bn5_then_activation_before_dropout3():
    torch.manual_seed(0)
    model = ConvNet("elu").eval()
    seen = {}
    model.act5.register_forward_hook(lambda module, inputs, output: seen.setdefault("act5", output))
    model.dropout3.register_forward_hook(lambda module, inputs, output: seen.setdefault("dropout_in", inputs[0]))
    x = torch.rand(3, 1, 28, 28)
    logits = model(x)
    torch.testing.assert_close(model.features(x), seen["act5"])
    torch.testing.assert_close(seen["act5"], seen["dropout_in"])
    torch.testing.assert_close(model.classify(model.features(x)), logits)


def test_model_standardises_its_input_with_its_buffers():
    torch.manual_seed(0)
    a = ConvNet(mean=0.0, std=1.0).eval()
    b = ConvNet(mean=0.5, std=2.0).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("input_")}, strict=False)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(b(x), a((x - 0.5) / 2.0))
    assert set(b.state_dict()) >= {"input_mean", "input_std"}


def test_the_activation_parameter_offers_exactly_the_models_activations():
    from mnist_tracking.core.config import ACTIVATIONS as CHOICES

    assert tuple(ACTIVATIONS) == CHOICES
