import pytest
import torch

from cifar_pl.config_checks import TRAIN_RULES
from cifar_pl.models import DROPOUT_PLACEMENTS, ImprovedCNN, LegacyNet, build_network, count_parameters


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", ["cnn", "legacy"])
def test_output_shape(arch, channels):
    net = build_network(arch, in_channels=channels, num_classes=7).eval()
    assert net(torch.zeros(5, channels, 32, 32)).shape == (5, 7)


@pytest.mark.parametrize(
    "arch, channels, classes, expected",
    [
        # conv 3*32*9+32, 32*64*9+64, 64*128*9+128; BN 2*(32+64+128); FC 128*64+64, 64*32+32, 32*10+10
        ("cnn", 3, 10, 896 + 18_496 + 73_856 + 448 + 8_256 + 2_080 + 330),
        ("cnn", 1, 10, 320 + 18_496 + 73_856 + 448 + 8_256 + 2_080 + 330),
        ("cnn", 3, 100, 896 + 18_496 + 73_856 + 448 + 8_256 + 2_080 + 3_300),
        # conv 3*6*25+6, 6*16*25+16; FC 400*120+120, 120*84+84, 84*10+10
        ("legacy", 3, 10, 456 + 2_416 + 48_120 + 10_164 + 850),
        ("legacy", 1, 10, 156 + 2_416 + 48_120 + 10_164 + 850),
    ],
)
def test_parameter_counts(arch, channels, classes, expected):
    assert count_parameters(build_network(arch, channels, classes)) == expected


def test_improved_cnn_is_about_104k_parameters():
    assert count_parameters(ImprovedCNN()) == 104_362


def test_cnn_takes_other_image_sizes_thanks_to_global_pooling():
    assert ImprovedCNN(1, 10).eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    net = ImprovedCNN()
    x = torch.randn(4, 3, 32, 32)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_legacy_net_has_the_original_layers():
    net = LegacyNet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(400, 120), (120, 84), (84, 10)]


def test_unknown_network_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"cnn.*legacy"):
        build_network("resnet", 3, 10)


def _inputs_to_head_layers(net: ImprovedCNN, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What the head's two hidden ReLUs put out, and what the Linear layer after each of them receives."""
    relus = [m for m in net.classifier if isinstance(m, torch.nn.ReLU)]
    linears = [m for m in net.classifier if isinstance(m, torch.nn.Linear)][1:]
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone())) for r in relus]
    hooks += [lin.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone())) for lin in linears]
    net(x)
    for hook in hooks:
        hook.remove()
    return outputs, inputs


@pytest.mark.parametrize(
    "placement, dropped", [("both", [True, True]), ("first", [True, False]), ("last", [False, True])]
)
def test_dropout_placement_drops_after_the_named_hidden_layers_only(placement, dropped):
    torch.manual_seed(0)
    net = ImprovedCNN(dropout=0.5, dropout_placement=placement).train()
    outputs, inputs = _inputs_to_head_layers(net, torch.randn(8, 3, 32, 32))
    for relu_out, next_in, should_drop in zip(outputs, inputs, dropped, strict=True):
        if should_drop:  # inverted dropout: every unit is either zeroed or scaled by 1 / (1 - 0.5)
            kept = next_in != 0
            assert (relu_out[kept] * 2 == next_in[kept]).all()
            assert ((relu_out != 0) & ~kept).sum() > 0, "some active units must have been dropped"
        else:
            assert torch.equal(relu_out, next_in)


def test_every_dropout_placement_loads_the_same_checkpoints():
    """Places without dropout hold an Identity, so layer indices (state_dict keys) do not move."""
    torch.manual_seed(0)
    both = ImprovedCNN(1, 10, dropout_placement="both").eval()
    x = torch.randn(2, 1, 32, 32)
    for placement in ("first", "last"):
        other = ImprovedCNN(1, 10, dropout_placement=placement).eval()
        other.load_state_dict(both.state_dict())  # strict: the same keys
        assert torch.equal(other(x), both(x))  # and in eval mode the same function


def test_no_dropout_makes_training_mode_deterministic():
    net = ImprovedCNN(dropout=0.0).train()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(net(x), net(x))


def test_unknown_dropout_placement_is_refused():
    with pytest.raises(ValueError, match=r"both.*first.*last"):
        ImprovedCNN(dropout_placement="middle")


def test_the_config_pass_accepts_exactly_the_dropout_placements_there_are():
    rule = TRAIN_RULES["model.dropout_placement"]  # spelt out there, so that the pass need not import torch
    assert all(rule.accepts(placement) for placement in DROPOUT_PLACEMENTS)
    assert rule.allowed == "one of " + ", ".join(DROPOUT_PLACEMENTS)
