"""FID: the JAX Inception equals torch-fidelity's network (random weights), the whole
folder -> FID path equals torch-fidelity features + clean-fid's resize + pytorch-fid's
distance, and the distance behaves (0 against itself, monotone as real images mix in)."""

import contextlib
import json
import importlib
import importlib.util
import itertools
import re
import sys
import types

import numpy as np
import pytest
import scipy.linalg
from PIL import Image
from conftest import run_cli

from cm3leon_jax.eval import fid as fid_lib
from cm3leon_jax.perception import inception as inc

BATCH = 4  # one compiled shape per feature layer for the whole file


@contextlib.contextmanager
def _stubbed(stubs: dict):
    """Modules stubbed in sys.modules (name -> attributes) for an import that must not run
    a package's __init__ or that would import torchvision (not installed here); the stubs
    and the modules imported under them are gone afterwards."""
    roots = {name.split(".")[0] for name in stubs}
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        for name, attrs in stubs.items():
            stub = types.ModuleType(name)
            for key, value in attrs.items():
                setattr(stub, key, value)
            mp.setitem(sys.modules, name, stub)
        try:
            yield
        finally:
            for name in set(sys.modules) - before - set(stubs):
                if name.split(".")[0] in roots:
                    del sys.modules[name]


def _torch_fidelity_inception():
    """torch_fidelity.feature_extractor_inceptionv3 without the package's __init__ (which
    imports torchvision)."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (`make install` adds it: FID_REFERENCES)")
    with _stubbed({"torch_fidelity": {"__path__": list(spec.submodule_search_locations)}}):
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def _pytorch_fid_distance():
    """pytorch_fid.fid_score.calculate_frechet_distance; fid_score imports torchvision and
    its torchvision-based network at the top, neither needed for the distance."""
    pytest.importorskip("torch")  # fid_score imports it
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid is not installed (`make install` adds it: FID_REFERENCES)")
    network = type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {64: 0, 192: 1, 768: 2, 2048: 3}})
    with _stubbed({"torchvision": {}, "torchvision.transforms": {},
                   "pytorch_fid.inception": {"InceptionV3": network}}):
        return importlib.import_module("pytorch_fid.fid_score").calculate_frechet_distance


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3 on random weights saved as a .pth.

    BatchNorm statistics are calibrated on random images so every layer's activations are
    O(1): running_mean is the batch mean, running_var the second moment about zero (not
    the variance, which for channels whose mean dwarfs their spread would amplify float32
    rounding by that ratio and make any two float32 implementations disagree at 1e-4)."""
    torch = pytest.importorskip("torch")
    fe = _torch_fidelity_inception()
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")

    class Unloaded(fe.FeatureExtractorInceptionV3):  # the modules, default-initialised
        def load_state_dict(self, state_dict, strict=True):
            return None

    g = torch.Generator().manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"],
                   feature_extractor_weights_path=str(folder / "empty.pth"))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 4:  # He-scaled conv kernels
                p.copy_(torch.randn(p.shape, generator=g) * np.sqrt(2.0 / p[0].numel()))
            elif name.endswith("bn.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bn.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:  # fc
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # one batch: running stats = that batch's
        net.train()
        net(torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8))
        for bn in bns:
            bn.running_var += bn.running_mean ** 2
    path = folder / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)  # with num_batches_tracked, as a saved module has
    return fe, path


def _torch_net(reference, features):
    """The genuine loading path: torch-fidelity reads the weight file itself."""
    fe, path = reference
    return fe.FeatureExtractorInceptionV3("inception-v3-compat", features,
                                          feature_extractor_weights_path=str(path))


@pytest.mark.slow
def test_pool_features_match_torch_fidelity(reference, tmp_path):
    torch = pytest.importorskip("torch")
    _, path = reference
    model = _torch_net(reference, ["64", "2048"])
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    images[1] = np.linspace(0, 255, 299)[None, :, None].astype(np.uint8)  # a smooth one
    with torch.no_grad():
        want64, want = (f.numpy().astype(np.float64)
                        for f in model(torch.from_numpy(images).permute(0, 3, 1, 2)))

    ours = inc.load_inception(path)
    got = inc.pool_features(ours, images, batch_size=BATCH)
    assert got.shape == (3, 2048) and got.dtype == np.float64
    assert 0.05 < np.abs(want).mean() < 5  # O(1) features: the tolerance means something
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    got64 = inc.pool_features(ours, images, batch_size=BATCH, dims=64)
    np.testing.assert_allclose(got64, want64, rtol=0, atol=1e-5)

    # the same weights through .npz and .safetensors (with torch's names)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    inc.save_npz(ours, tmp_path / "w.npz")
    safetensors_numpy.save_file({k: np.asarray(v) for k, v in ours.params.items()},
                                str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        again = inc.load_inception(tmp_path / name)
        assert again.params.keys() == ours.params.keys()
        for k, v in ours.params.items():
            np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(v))
    # a DataParallel save (module. prefix) is read too
    state = {"module." + k: v for k, v in torch.load(path, weights_only=True).items()}
    torch.save(state, tmp_path / "dp.pth")
    assert inc.load_inception(tmp_path / "dp.pth").params.keys() == ours.params.keys()


def _write_sets(root):
    """Two small folders: random and structured 64x64 images; a grayscale and an RGBA PNG
    among the real ones, a JPEG and other sizes among the fake ones."""
    rng = np.random.default_rng(2)
    real, fake = root / "real", root / "fake"
    real.mkdir()
    fake.mkdir()
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i in range(20):
        if i % 2:
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        else:
            phase = rng.uniform(0, 2 * np.pi, 3)
            image = (127.5 + 127.5 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)
                     ).astype(np.uint8)
        pil = Image.fromarray(image)
        if i == 4:
            pil = pil.convert("L")
        if i == 6:
            pil = pil.convert("RGBA")
        pil.save(real / f"{i:03d}.png")
    for i in range(20):
        h, w = (48, 80) if i % 3 == 0 else (64, 64)
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), np.uint8))  # blocky
        if i == 5:
            Image.fromarray(image).save(fake / f"{i:03d}.jpg", quality=90)
        else:
            Image.fromarray(image).save(fake / f"{i:03d}.png")
    return real, fake


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_of_folders_equals_the_torch_reference(reference, tmp_path, monkeypatch):
    """fid() on two folders vs the reference chain: PIL decode, clean-fid's resizer, the
    torch-fidelity network on the resized floats, np.cov, pytorch-fid's distance. On the
    64-d features (pytorch-fid's --dims 64): the 2048-d sqrtm alone takes ~50 s on 2 cores,
    and the 2048-d features are held to torch above."""
    torch = pytest.importorskip("torch")
    resize = pytest.importorskip("cleanfid.resize")
    fe, path = reference
    model = _torch_net(reference, ["64"])
    calculate_frechet_distance = _pytorch_fid_distance()
    real, fake = _write_sets(tmp_path)
    clean = resize.build_resizer("clean")
    # torch-fidelity's network insists on uint8, which would quantise the resized pixels
    monkeypatch.setattr(fe, "vassert", lambda *args, **kwargs: None)

    def reference_stats(folder):
        files = sorted(folder.iterdir())
        pixels = np.stack([clean(np.asarray(Image.open(f).convert("RGB"))) for f in files])
        with torch.no_grad():
            feats = model(torch.from_numpy(pixels).permute(0, 3, 1, 2))[0].numpy()
        feats = feats.astype(np.float64)
        return feats.mean(axis=0), np.cov(feats, rowvar=False)

    want = calculate_frechet_distance(*reference_stats(real), *reference_stats(fake))
    ours = inc.load_inception(path)
    got = fid_lib.fid(real, fake, ours, batch_size=BATCH, dims=64)
    assert got["n_real"] == got["n_fake"] == 20
    assert want > 1  # the sets differ
    assert got["fid"] == pytest.approx(want, rel=1e-3)

    # the same through saved statistics, either side
    fid_lib.save_stats(tmp_path / "real.npz", *fid_lib.stats_of(real, ours, BATCH, dims=64))
    again = fid_lib.fid(tmp_path / "real.npz", fake, ours, batch_size=BATCH, dims=64)
    assert again == pytest.approx(got)
    # centre crops: a wide image is its central square before the resize
    wide = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    np.testing.assert_array_equal(fid_lib.center_square(wide), wide[:, 2:8])
    np.testing.assert_array_equal(fid_lib.center_square(wide.transpose(1, 0, 2)),
                                  wide.transpose(1, 0, 2)[2:8])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_frechet_distance_is_pytorch_fids(monkeypatch):
    """The formula against pytorch-fid's, including the diagonal retry: the first sqrtm of
    each call is made to fail."""
    calculate_frechet_distance = _pytorch_fid_distance()
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 24)), rng.normal(0.3, 1.2, size=(30, 24))  # rank-deficient
    stats = (*fid_lib.statistics(a), *fid_lib.statistics(b))
    assert fid_lib.frechet_distance(*stats) == pytest.approx(
        calculate_frechet_distance(*stats), rel=1e-12)

    # both implementations call sqrtm through the scipy.linalg module
    sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_first(m, *args, **kwargs):
        calls.append(1)
        out = sqrtm(m, *args, **kwargs)
        if len(calls) % 2 == 1:
            return (np.full_like(m, np.nan), 0.0) if args or kwargs else np.full_like(m, np.nan)
        return out

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_first)
    with pytest.warns(RuntimeWarning, match="singular product"):
        got = fid_lib.frechet_distance(*stats)
    want = calculate_frechet_distance(*stats)
    assert len(calls) == 4
    assert got == pytest.approx(want, rel=1e-12)


def test_fid_against_itself_is_zero():
    rng = np.random.default_rng(4)
    mu, sigma = fid_lib.statistics(rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)))
    assert abs(fid_lib.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_falls_as_real_images_mix_in():
    rng = np.random.default_rng(5)
    d, n = 16, 400
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    real = rng.normal(size=(n, d)) @ mix
    more_real = rng.normal(size=(n, d)) @ mix
    fake = rng.normal(0.8, 1.5, size=(n, d)) @ mix
    target = fid_lib.statistics(real)
    fids = []
    for k in range(0, n + 1, n // 8):
        mixed = np.concatenate([more_real[:k], fake[k:]])
        fids.append(fid_lib.frechet_distance(*target, *fid_lib.statistics(mixed)))
    assert all(later < earlier for earlier, later in itertools.pairwise(fids)), fids
    assert fids[-1] < 0.05 * fids[0]


def test_bad_inputs_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        fid_lib.image_files(empty)
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        fid_lib.stats_of(empty, None)

    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(str(broken / "b.png"))):
        fid_lib.features_of(broken, inc.random_init(0), dims=64)

    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(4))
    with pytest.raises(ValueError, match=re.escape(str(stats)) + ".*sigma"):
        fid_lib.stats_of(stats, None, dims=4)
    fid_lib.save_stats(tmp_path / "ok.npz", np.zeros(4), np.eye(4), None)  # n unknown
    assert fid_lib.load_stats(tmp_path / "ok.npz")[2] is None
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "ok.npz")) + ".*2048"):
        fid_lib.stats_of(tmp_path / "ok.npz", None)

    weights = tmp_path / "weights.npz"
    np.savez(weights, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32),
                         "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError,
                       match=re.escape(str(weights)) + ".*missing.*unknown 1 key.*AuxLogits"):
        inc.load_inception(weights)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.pth"))):
        inc.load_inception(tmp_path / "none.pth")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_eval_fid_cli_on_images_self_zero_and_mixing_falls(tmp_path, capsys):
    """Through `cm3leon eval fid` on image folders (a random Inception, 64-d features): a set
    against itself is 0, and FID falls at every step as a fake set takes in real images."""
    real, fake = _write_sets(tmp_path)
    weights = tmp_path / "inception.npz"
    inc.save_npz(inc.random_init(0), weights)

    def fid_cli(a, b):
        code, out, err = run_cli(capsys, "eval", "fid", "--real", str(a), "--fake", str(b),
                                 "--inception-weights", str(weights), "--dims", "64",
                                 "--json")
        assert code == 0, err
        return json.loads(out.splitlines()[-1])["fid"]

    assert abs(fid_cli(real, real)) < 1e-6
    reals, fakes = sorted(real.iterdir()), sorted(fake.iterdir())
    fids = []
    for k in range(0, 21, 4):  # k real images replace k fake ones
        mixed = tmp_path / f"mixed{k}"
        mixed.mkdir()
        for f in [*reals[:k], *fakes[k:]]:
            (mixed / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
        fids.append(fid_cli(real, mixed))
    assert all(a > b for a, b in zip(fids, fids[1:])), fids
    assert abs(fids[-1]) < 1e-6
    # statistics saved once stand in for the folder; two .npz need no weights
    code, _, _ = run_cli(capsys, "eval", "fid", "--real", str(real), "--inception-weights",
                         str(weights), "--dims", "64", "--save-stats", str(tmp_path / "r.npz"))
    assert code == 0
    code, out, _ = run_cli(capsys, "eval", "fid", "--real", str(tmp_path / "r.npz"), "--fake",
                           str(tmp_path / "r.npz"), "--dims", "64", "--json")
    assert code == 0 and abs(json.loads(out.splitlines()[-1])["fid"]) < 1e-6
    code, _, err = run_cli(capsys, "eval", "fid", "--real", str(real), "--fake", str(fake))
    assert code == 2 and "--inception-weights: a folder of images needs" in err
