"""LPIPS in JAX equals a torch reference on random weights, loaded through `load_lpips`.

The reference is written here in torch.nn, because the `lpips` package imports torchvision
at its top (pretrained_networks.py) and torchvision is not importable here (the registry's
wheel does not load against the local CPU torch): VGG16's `features` exactly as
torchvision's `vgg16()` builds them (`make_layers(cfgs["D"])`: Conv2d 3x3 padding 1 + ReLU,
MaxPool2d(2, 2) after each block, so the state-dict names are `features.{i}.weight/bias`),
sliced at relu1_2 / relu2_2 / relu3_3 / relu4_3 / relu5_3 as `lpips.pretrained_networks.vgg16`
slices it, and lpips 0.1.4's `ScalingLayer`, `normalize_tensor`, `NetLinLayer` (Dropout +
1x1 Conv2d without bias, hence `lin{k}.model.1.weight`), `spatial_average` and layer sum,
copied from lpips/lpips.py and lpips/__init__.py. Random He-scaled kernels, random biases
and random non-negative heads are saved with torch.save as two .pth files in torchvision's
and lpips' key layouts; torch loads its modules from them with load_state_dict, JAX through
`load_lpips`, the path users take with the published files.
"""

import dataclasses

import jax
import numpy as np
import pytest

from cm3leon_jax.perception import lpips as lp

torch = pytest.importorskip("torch")
nn = torch.nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"]  # torchvision's cfgs["D"]
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # lpips.pretrained_networks.vgg16


class TorchVGG16(nn.Module):
    """torchvision.models.vgg16's `features` (its classifier is not needed for LPIPS)."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)


class NetLinLayer(nn.Module):
    """lpips.lpips.NetLinLayer with use_dropout=True, as LPIPS builds its heads."""

    def __init__(self, chn_in):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class TorchLPIPS(nn.Module):
    """lpips.LPIPS(net='vgg', version='0.1') in eval mode, forward(in0, in1) on [-1, 1]."""

    def __init__(self, vgg: TorchVGG16):
        super().__init__()
        self.vgg = vgg
        self.register_buffer("shift", torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.Tensor([.458, .448, .450])[None, :, None, None])
        for k, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{k}", NetLinLayer(c))

    @staticmethod
    def normalize_tensor(in_feat, eps=1e-10):
        norm_factor = torch.sqrt(torch.sum(in_feat ** 2, dim=1, keepdim=True))
        return in_feat / (norm_factor + eps)

    def forward(self, in0, in1):
        h0, h1 = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale
        val = 0
        for k, (a, b) in enumerate(SLICES):
            s = self.vgg.features[a:b]
            h0, h1 = s(h0), s(h1)
            diff = (self.normalize_tensor(h0) - self.normalize_tensor(h1)) ** 2
            val = val + getattr(self, f"lin{k}")(diff).mean([2, 3], keepdim=True)
        return val


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch LPIPS, vgg .pth, heads .pth) on one set of random weights."""
    folder = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg = TorchVGG16()
    with torch.no_grad():
        for name, p in vgg.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) * np.sqrt(2.0 / p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    state = vgg.state_dict()
    state["classifier.6.bias"] = torch.zeros(1000)  # the real file's classifier: not used
    torch.save(state, folder / "vgg16-random.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=g)
             for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, folder / "vgg-heads-random.pth")

    fresh = TorchVGG16()  # the reference reads the files, as users' torch code would
    fresh.load_state_dict({k: v for k, v in torch.load(folder / "vgg16-random.pth").items()
                           if k.startswith("features.")})
    net = TorchLPIPS(fresh)
    missing, unexpected = net.load_state_dict(torch.load(folder / "vgg-heads-random.pth"),
                                              strict=False)
    assert not unexpected and not any(k.startswith("lin") for k in missing)
    return net.eval(), folder / "vgg16-random.pth", folder / "vgg-heads-random.pth"


def _torch_distance(net, x, y):
    """The reference on NHWC float [-1, 1] numpy images -> float64 [N]."""
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return net(to(x), to(y)).reshape(-1).double().numpy()


def _pairs(size):
    """Three pairs: independent noise, a smooth image against a slightly perturbed copy
    (a small distance), and a smooth image against noise."""
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    y = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    x[1] = x[2] = np.stack([ramp[None, :] * np.ones((size, 1)), ramp[:, None] * np.ones(size),
                            np.outer(ramp, ramp)], -1)
    y[1] = np.clip(x[1] + rng.normal(0, 0.05, x[1].shape), -1, 1)
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 50])  # 50: odd sizes before the pools (25 -> 12)
def test_distance_matches_torch_reference(reference, size):
    net, vgg_path, heads_path = reference
    ours = lp.load_lpips(vgg_path, heads_path)
    assert ours.pretrained and str(vgg_path) in ours.source
    x, y = _pairs(size)
    want = _torch_distance(net, x, y)
    got = np.asarray(ours(x, y), np.float64)
    assert got.shape == (3,) and 0.01 < want.min() and want.max() < 10  # O(1): tolerance bites
    assert want[1] < want[0] / 3  # the perturbed copy is nearest
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # invariants: 0 against itself, symmetric, never negative
    np.testing.assert_array_equal(np.asarray(ours(x, x)), 0)
    np.testing.assert_allclose(np.asarray(ours(y, x)), got, rtol=1e-6, atol=0)
    assert (got > 0).all()

    # uint8 images are x / 127.5 - 1
    u = np.random.default_rng(7).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    v = np.random.default_rng(8).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    f = lambda a: (a.astype(np.float32) / 127.5 - 1).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ours(u, v)), _torch_distance(net, f(u), f(v)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_jit_and_finite_gradient_where_a_tap_is_zero(reference):
    """The model is a pytree a jitted step takes as an argument; its gradient stays finite
    where a whole tap is zero after the ReLU (torch's sqrt gives nan there)."""
    _, vgg_path, heads_path = reference
    ours = lp.load_lpips(vgg_path, heads_path)
    x, y = _pairs(32)
    step = jax.jit(lambda model, a, b: model(a, b))
    np.testing.assert_allclose(np.asarray(step(ours, x, y)), np.asarray(ours(x, y)),
                               rtol=1e-6)
    bias = ours.params["features.28.bias"]
    dead = dataclasses.replace(ours, params={**ours.params,
                                             "features.28.bias": bias - 1e4})  # relu5_3 = 0
    grad = np.asarray(jax.grad(lambda a: dead(a, y).sum())(x))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_npz_round_trip_and_refused_inputs(tmp_path):
    """Without torch through .npz; wrong files and wrong images are refused by name."""
    ours = lp.random_init(0)
    lp.save_npz(ours, tmp_path / "vgg.npz", tmp_path / "heads.npz")
    again = lp.load_lpips(tmp_path / "vgg.npz", tmp_path / "heads.npz")
    assert again.pretrained and not ours.pretrained
    assert again.params.keys() == ours.params.keys()
    for k, v in ours.params.items():
        np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(v))
    baseline = lp.load_lpips(None, None)
    assert not baseline.pretrained and "no perceptual meaning" in baseline.source

    heads = dict(np.load(tmp_path / "heads.npz"))
    heads["lin2.model.1.weight"] = -heads["lin2.model.1.weight"]
    np.savez(tmp_path / "negative.npz", **heads)
    with pytest.raises(ValueError, match="lin2.model.1.weight has negative weights"):
        lp.load_lpips(None, tmp_path / "negative.npz")
    del heads["lin4.model.1.weight"]
    np.savez(tmp_path / "short.npz", **heads)
    with pytest.raises(ValueError, match=r"short\.npz: not lpips.*missing 1 key.*lin4"):
        lp.load_lpips(None, tmp_path / "short.npz")
    with pytest.raises(ValueError, match=r"heads\.npz: not torchvision's VGG16.*missing 26"):
        lp.load_lpips(tmp_path / "heads.npz", None)
    with pytest.raises(FileNotFoundError, match=r"none\.pth.*vgg16-397923af\.pth"):
        lp.load_lpips(tmp_path / "none.pth", None)
    x = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="at least 16x16"):
        ours(x, x)
    with pytest.raises(ValueError, match="one shape"):
        ours(x, x[:1])
