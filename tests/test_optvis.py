"""Feature visualization: parameterizations, transforms, objectives, facets and render, on ResNet and ViT."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope import Unit
from clipscope import optvis as ov
from clipscope.hooks import feature_last
from clipscope.optvis.objectives import Context

# Per model: a site to maximize, a lower site (for facets), and a single-location selector.
SPEC = {
    "clipscope-tiny-rn": {"site": "visual.layer4.0.act3.pre", "lower": "visual.layer2.0", "where": {"position": (1, 0)}},
    "clipscope-tiny-vit": {"site": "visual.transformer.resblocks.1", "lower": "visual.transformer.resblocks.0",
                           "where": {"token": 3}},
}
STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(model) -> dict:
    return SPEC[model.name]


def render(model, objective, **kw):
    kw.setdefault("steps", STEPS)
    return ov.render(model, objective, progress=False, **kw)


def assert_rises(trace: torch.Tensor, baseline: torch.Tensor, k: int = 4) -> None:
    """The objective rose, per batch element, by a clear margin.

    ``baseline`` is the trace of the same render with ``lr=0``: the initial images
    seen through the very same random transforms at every step, so ``trace - baseline``
    is the gain from optimizing alone, free of transform noise. The last ``k``
    steps must beat the first ``k`` and every one of the last ``k`` must beat the
    baseline by more than 1e-4 of the objective's size.
    """
    first, last = trace[:k].mean(dim=0), trace[-k:].mean(dim=0)
    assert bool((last > first).all()), f"objective did not rise: first {first.tolist()}, last {last.tolist()}"
    gain = (trace - baseline)[-k:]
    floor = 1e-4 * baseline.abs().mean(dim=0) + 1e-9
    assert bool((gain > floor).all()), f"no clear gain over the unoptimized images: {gain.tolist()}"


def rises(model, objective, param=None, **kw) -> ov.RenderResult:
    """Render ``objective`` and assert that it rises; ``param`` is a kind ("maco", ...) or a factory for a
    fresh ImageParam."""
    def fresh() -> dict:
        return {} if param is None else {"param": param if isinstance(param, str) else param()}
    result = render(model, objective, **kw, **fresh())
    baseline = render(model, objective, lr=0.0, **kw, **fresh())
    assert_rises(result.trace, baseline.trace)
    return result


# ---------------------------------------------------------------------------------------
# Parameterizations


@pytest.mark.parametrize("kind", ["fourier", "pixels", "maco"])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_params_give_differentiable_images_in_unit_range(kind, size):
    p = ov.make_param(kind, 3, size, seed=0)
    img = p()
    assert img.shape == (3, 3, *size) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    (img * torch.linspace(-1, 1, size[1])).sum().backward()
    grads = [t.grad for t in p.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fourier_param_is_lucents_and_seeded():
    from lucent.optvis.param import spatial
    a, b, c = ov.FourierImage(2, 16, seed=1), ov.FourierImage(2, 16, seed=1), ov.FourierImage(2, 16, seed=2)
    assert torch.equal(a(), b()) and not torch.equal(a(), c())
    # the parameter has lucent's spectrum layout: (B, C, H, W // 2 + 1, real/imag)
    assert a.parameters()[0].shape == (2, 3, *spatial.rfft2d_freqs(16, 16).shape, 2)


def test_maco_optimizes_phase_only_and_keeps_its_magnitude():
    p = ov.MacoImage(2, (16, 20), seed=0)
    magnitude, phase0 = p.magnitude.clone(), p.phase.detach().clone()
    assert [t is p.phase for t in p.parameters()] == [True]
    opt = torch.optim.Adam(p.parameters(), lr=p.lr)
    for _ in range(5):
        opt.zero_grad()
        (-p()[:, 0].mean()).backward()  # make the images redder
        opt.step()
    assert torch.equal(p.magnitude, magnitude)
    assert (p.phase.detach() - phase0).abs().mean() > 0.05
    # the synthesized field has exactly that magnitude (columns 1..W/2-1: the others are real-valued bins)
    with torch.no_grad():
        amp = torch.fft.rfft2(p.field(), norm="ortho").abs()
    torch.testing.assert_close(amp[..., 1:-1], magnitude.expand_as(amp)[..., 1:-1], rtol=1e-3, atol=1e-5)


def test_natural_spectrum_follows_a_power_law():
    from clipscope.optvis.param import _spectrum_fit
    _, alphas = _spectrum_fit()
    assert all(0.8 < a < 2.0 for a in alphas)
    mag = ov.natural_spectrum((32, 32))
    assert mag.shape == (3, 32, 17)
    assert mag[:, 0, 1] .gt(mag[:, 0, 8]).all() and mag[:, 0, 8].gt(mag[:, 0, 16]).all()


# ---------------------------------------------------------------------------------------
# Transforms


def _ramp(b=3, h=20, w=24):
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (torch.stack([x, y, x + y]).float() / (h + w)).expand(b, 3, h, w).contiguous()


@pytest.mark.parametrize("t", [ov.Jitter(3), ov.RandomScale(0.8, 1.2), ov.RandomRotate(20), ov.Pad(2),
                               ov.RandomCrop((10, 12)), ov.standard_transforms(20)], ids=repr)
def test_transforms_are_deterministic_given_a_generator(t):
    x = _ramp()
    out = t(x, generator=torch.Generator().manual_seed(0))
    again = t(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.dtype == x.dtype
    if not isinstance(t, (ov.Pad, ov.RandomCrop, ov.Compose)):
        assert out.shape == x.shape
    if not isinstance(t, ov.Pad):  # random: other seeds and other batch elements differ
        other = t(x, generator=torch.Generator().manual_seed(1))
        assert not torch.equal(out, other) and not torch.equal(out[0], out[1])


def test_transform_shapes_and_exactness():
    x = _ramp()
    assert ov.Pad(2)(x).shape == (3, 3, 24, 28)
    assert ov.RandomCrop((10, 12))(x).shape == (3, 3, 10, 12)
    crop = ov.RandomCrop((10, 12))(x, generator=torch.Generator().manual_seed(3))
    # a crop is an exact window: its top-left pixel's value says where it came from
    for i in range(3):
        ox, oy = round(float(crop[i, 0, 0, 0]) * 44), round(float(crop[i, 1, 0, 0]) * 44)
        torch.testing.assert_close(crop[i], x[i, :, oy:oy + 10, ox:ox + 12])
    # jitter shifts by whole pixels: the interior is the input moved, with no blur
    shifted = ov.Jitter(2)(x, generator=torch.Generator().manual_seed(0))
    d = (shifted - x)[:, 0, 4:-4, 4:-4]
    assert torch.allclose(d, d[:, :1, :1].expand_as(d), atol=1e-5)
    assert torch.allclose((d[:, 0, 0] * 44) % 1, torch.zeros(3), atol=1e-4)
    assert ov.standard_transforms(224).transforms[0].width == 12


def test_compose_fuses_geometric_transforms_into_one_resampling():
    x = _ramp()
    steps = [ov.Jitter(2), ov.RandomScale(0.9, 1.1), ov.RandomRotate(10)]
    fused = ov.Compose(steps)(x, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    one_by_one = x
    for t in steps:
        one_by_one = t(one_by_one, generator=g)
    # bilinear resampling is exact on a linear ramp, so away from the borders both agree
    torch.testing.assert_close(fused[..., 6:-6, 6:-6], one_by_one[..., 6:-6, 6:-6], atol=1e-4, rtol=0)


def test_transforms_are_differentiable():
    x = _ramp().requires_grad_(True)
    ov.standard_transforms(20)(x, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_input_uses_the_models_mean_and_std(tiny):
    x = torch.rand(2, 3, 20, 20)
    out = ov.ClipInput(tiny)(x)
    assert out.shape == (2, 3, *tiny.image_size) and out.dtype == tiny.dtype
    resized = torch.nn.functional.interpolate(x, size=tiny.image_size, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(tiny.image_mean).view(1, 3, 1, 1), torch.tensor(tiny.image_std).view(1, 3, 1, 1)
    tol = {} if tiny.dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.float().cpu(), (resized - mean) / std, **tol)
    assert tiny.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP's, not ImageNet's
    imagenet = (resized - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / 0.225
    assert not torch.allclose(out.float().cpu(), imagenet, atol=1e-2)


# ---------------------------------------------------------------------------------------
# Objectives: each one's value rises under optimization, on both architectures


def test_channel_rises(tiny):
    r = rises(tiny, ov.channel(spec(tiny)["site"], 3), batch=2)
    assert r.trace.shape == (STEPS, 2)


def test_channel_rises_with_maco(tiny):
    rises(tiny, ov.channel(spec(tiny)["site"], 3), param="maco")


def test_channel_rises_with_pixels_seen_untransformed(tiny):
    # Per-pixel images are fragile: one jitter or rotation draw can undo a step's gain (why Fourier and
    # MACO parameterizations exist), so plain pixels are checked on the image as optimized.
    rises(tiny, ov.channel(spec(tiny)["site"], 3), param="pixels", transforms=())


@pytest.mark.parametrize("transforms", [(), [ov.Jitter(1), ov.RandomRotate(5)]], ids=["none", "custom"])
def test_channel_rises_without_or_with_custom_transforms(tiny, transforms):
    rises(tiny, ov.channel(spec(tiny)["site"], 3), transforms=transforms)


def test_neuron_at_one_location_rises(tiny):
    s = spec(tiny)
    rises(tiny, ov.neuron(s["site"], 5, **s["where"]))


def test_direction_rises(tiny):
    site = spec(tiny)["site"]
    vec = torch.randn(tiny.site(site).n_units, generator=torch.Generator().manual_seed(0))
    rises(tiny, ov.direction(site, vec))


def test_unit_objective_rises(tiny):
    s = spec(tiny)
    u = Unit(s["site"], index=4, **s["where"])
    r = rises(tiny, ov.unit(u))
    assert r.labels == [ov.objectives.unit_label(u)]


def test_text_direction_rises_and_is_a_cosine(tiny):
    if tiny.dtype != torch.float32:
        pytest.skip("on a random tiny model the gains (~1e-4) are below fp16's resolution")
    obj = ov.text_direction(tiny, "a photo of Spider-Man")
    r = rises(tiny, obj, batch=2)
    assert r.trace.abs().max() <= 1
    with torch.no_grad():
        emb = tiny.encode_image(ov.ClipInput(tiny)(r.images))
        target = tiny.encode_text(["a photo of Spider-Man"])[0]
    torch.testing.assert_close(obj(Context(tiny, {}, emb, r.images)), emb @ target)


def test_diversity_rises(tiny):
    r = rises(tiny, ov.diversity(spec(tiny)["site"]), batch=3)
    assert r.trace.shape == (STEPS, 3) and (r.trace <= 1).all() and (r.trace >= -1).all()
    # near-identical grey images start at -1 (identical Gram matrices); any motion raises that a
    # little, so ask for a rise that only pushing the images apart gives
    assert bool((r.trace[-4:].mean(0) - r.trace[:4].mean(0) > 0.1).all())


@pytest.mark.parametrize("penalty", [ov.l2, ov.blur, ov.total_variation])
def test_regularizers_fall_when_minimized(tiny, penalty):
    r = rises(tiny, -penalty(), param=lambda: ov.PixelImage(2, 16, sd=2.0, seed=0))
    assert r.trace.shape == (STEPS, 2)
    assert (r.trace <= 0).all()  # penalties are non-negative


def test_regularized_objective_combines(tiny):
    obj = ov.channel(spec(tiny)["site"], 1) - 0.01 * ov.total_variation() - 0.01 * ov.l2()
    assert obj.sites == (spec(tiny)["site"],)
    rises(tiny, obj)


def test_objective_arithmetic(tiny):
    site = spec(tiny)["site"]
    a, b = ov.channel(site, 0), ov.channel(site, 1)
    x = ov.ClipInput(tiny)(torch.rand(2, 3, *tiny.image_size))
    with torch.no_grad(), tiny.capture(site, grad=True) as acts:
        emb = tiny.encode_image(x, normalize=False)
    ctx = Context(tiny, acts, emb, torch.rand(2, 3, 8, 8))
    va, vb = a(ctx), b(ctx)
    torch.testing.assert_close((2 * a - b / 4 + 1)(ctx), 2 * va - vb / 4 + 1)
    torch.testing.assert_close((-a)(ctx), -va)
    torch.testing.assert_close((3 - a)(ctx), 3 - va)
    torch.testing.assert_close(ov.Objective.sum([a, b, a])(ctx), 2 * va + vb)
    torch.testing.assert_close(sum([a, b])(ctx), va + vb)
    scalar = ov.Objective(lambda c: torch.tensor(0.5), "half")
    assert scalar(ctx).shape == (2,)
    with pytest.raises(TypeError):
        a * b
    # one objective per batch element
    torch.testing.assert_close(ov.batched([a, Unit.channel(site, 1)])(ctx), torch.stack([va[0], vb[1]]))


# ---------------------------------------------------------------------------------------
# Render


def test_render_draws_many_units_in_one_batch(tiny):
    site = spec(tiny)["site"]
    units = [Unit.channel(site, c) for c in (0, 3, 5, 7)]
    tiny.layers()  # site discovery runs the tower once, on first use: not part of the count
    calls = []
    handle = tiny.model.visual.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        r = rises(tiny, units)
    finally:
        handle.remove()
    assert len(calls) == 2 * STEPS  # one forward pass per step for the whole batch (two renders)
    assert r.images.shape == (4, 3, *tiny.image_size) and r.images.device.type == "cpu"
    assert r.units == units and r.trace.shape == (STEPS, 4)
    # image i drives unit i harder than the other units' images do
    x = ov.ClipInput(tiny)(r.images)
    with torch.no_grad(), tiny.capture(site) as acts:
        tiny.encode_image(x)
    table = torch.stack([tiny.read(u, acts) for u in units])  # (unit, image)
    z = (table - table.mean(1, keepdim=True)) / table.std(1, keepdim=True)
    assert z.diagonal().mean() > z.mean() + 0.5


@pytest.mark.parametrize("kind", ["fourier", "pixels", "maco"])
def test_render_is_reproducible_given_the_seed(tiny_vit, kind):
    units = [Unit.neuron("visual.transformer.resblocks.1.mlp.c_fc", i) for i in (1, 2)]
    a = render(tiny_vit, units, param=kind, steps=5, seed=3)
    b = render(tiny_vit, units, param=kind, steps=5, seed=3)
    c = render(tiny_vit, units, param=kind, steps=5, seed=4)
    if tiny_vit.device.type == "cpu":
        assert torch.equal(a.images, b.images) and torch.equal(a.trace, b.trace)
    else:  # GPU kernels may add in a different order (atomics in backward passes): equal up to rounding
        torch.testing.assert_close(a.images, b.images, atol=1e-3, rtol=0)
        torch.testing.assert_close(a.trace, b.trace, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(a.images, c.images, atol=1e-2)


def test_an_objective_reading_the_embedding_must_say_so(tiny):
    site = spec(tiny)["site"]
    norm = ov.Objective(lambda ctx: ctx.embedding.norm(dim=-1), "embedding norm", reads_embedding=True)
    r = render(tiny, norm + ov.channel(site, 0), steps=3)
    assert r.trace.shape == (3, 1) and torch.isfinite(r.trace).all()
    undeclared = ov.Objective(lambda ctx: ctx.embedding.norm(dim=-1), "embedding norm") + ov.channel(site, 0)
    with pytest.raises(RuntimeError, match="reads_embedding=True"):
        render(tiny, undeclared, steps=1)


def test_render_rejects_bad_units(tiny):
    with pytest.raises(ValueError, match="Unknown site"):
        render(tiny, Unit.channel("visual.nope", 0), steps=1)
    site = spec(tiny)["site"]
    n = tiny.site(site).n_units
    with pytest.raises(ValueError, match="out of range"):
        render(tiny, [Unit.channel(site, 0), Unit.channel(site, n)], steps=1)
    with pytest.raises(ValueError, match="direction has"):
        render(tiny, ov.direction(site, torch.ones(n + 1)), steps=1)
    with pytest.raises(ValueError, match="batch"):
        render(tiny, [Unit.channel(site, 0)], batch=2, steps=1)
    with pytest.raises(ValueError, match="holds 3 images"):
        render(tiny, Unit.channel(site, 0), param=ov.PixelImage(3, 8), batch=2, steps=1)
    with pytest.raises(ValueError, match="unknown parameterization"):
        render(tiny, Unit.channel(site, 0), param="jpeg", steps=1)


def test_render_result_plots_shows_and_saves(tiny_vit, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    units = [Unit.neuron("visual.transformer.resblocks.1", i) for i in range(3)]
    r = render(tiny_vit, units, steps=2, size=24)
    assert r.images.shape == (3, 3, 24, 24)
    fig = r.plot()
    assert len([ax for ax in fig.axes if ax.images]) == 3
    assert "data:image/png;base64," in r._repr_html_()
    paths = r.save(tmp_path / "out")
    assert [p.name for p in paths] == [f"{i:03d}_visual.transformer.resblocks.1_{i}.png" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]  # no temp files left
    with Image.open(paths[1]) as im:
        assert im.size == (24, 24)
        assert np.abs(np.asarray(im, dtype=float) / 255 - r.images[1].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6


# ---------------------------------------------------------------------------------------
# Faceted feature visualization


def _facet_images(n: int, seed: int):
    """Facet: a saturated red disc on dark noise. Generic: coloured noise."""
    rng = np.random.default_rng(seed)
    facet, generic = [], []
    yy, xx = np.mgrid[:48, :48]
    for _ in range(n):
        arr = rng.integers(0, 70, (48, 48, 3), dtype=np.uint8)
        cy, cx, rad = rng.integers(14, 34, 2).tolist() + [int(rng.integers(8, 14))]
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = (230, 30, 30)
        facet.append(Image.fromarray(arr))
        generic.append(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)))
    return facet, generic


@pytest.fixture(scope="module")
def facets(tiny_rn, tiny_vit):
    facet, generic = _facet_images(24, 0)
    return {m.name: ov.train_facet(m, SPEC[m.name]["lower"], facet, generic) for m in (tiny_rn, tiny_vit)}


def test_facet_probe_separates_facet_images(tiny, facets):
    facet = facets[tiny.name]
    assert facet.train_accuracy >= 0.9
    assert facet.weights.shape == (tiny.site(facet.site).n_units,)
    held_out, generic = _facet_images(8, 1)
    feats = torch.cat([ov.pooled_activations(tiny, facet.site, held_out), ov.pooled_activations(tiny, facet.site, generic)])
    assert facet.probe.accuracy(feats, [1] * 8 + [0] * 8) >= 0.85


def test_faceted_term_is_the_weighted_attribution(tiny, facets):
    """f + w.(g * grad f) matches a finite difference of f along g -> g * (1 + eps * w)."""
    if tiny.dtype != torch.float32:
        pytest.skip("a finite difference needs fp32 (this is the suite's reduced-precision GPU run)")
    facet, site = facets[tiny.name], spec(tiny)["site"]
    u = Unit.channel(site, 3)
    x = ov.ClipInput(tiny)(torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)))
    with ov.facets.second_order_forward(), tiny.capture([site, facet.site], grad=True) as acts:
        emb = tiny.encode_image(x.requires_grad_(True), normalize=False)
    ctx = Context(tiny, acts, emb, x)
    value = ov.faceted(u, facet)(ctx)
    f = ctx.read(u).detach()
    term = (value.detach() - f)
    g = acts[facet.site].detach()
    layout = tiny.site(facet.site).layout

    def f_scaled(eps: float) -> torch.Tensor:
        scaled = feature_last(g, layout) * (1 + eps * facet.weights.to(g.device, g.dtype))
        with contextlib.ExitStack() as stack, torch.no_grad():
            for c in range(len(facet.weights)):
                stack.enter_context(tiny.ablate(Unit(facet.site, index=c), scaled[..., c]))
            with tiny.capture(site) as out:
                tiny.encode_image(x.detach())
        return tiny.read(u, out)

    eps = 1e-2 / float(facet.weights.abs().max())
    finite = (f_scaled(eps) - f_scaled(-eps)) / (2 * eps)
    assert term.abs().max() > 0
    torch.testing.assert_close(term, finite, rtol=2e-2, atol=1e-3 * float(term.abs().max()))
    # and the faceted objective keeps the image in the graph (second-order through the hooks)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_faceted_objective_rises(tiny, facets):
    facet = facets[tiny.name]
    obj = ov.faceted(Unit.channel(spec(tiny)["site"], 3), facet, strength=1.0)
    assert set(obj.sites) == {spec(tiny)["site"], facet.site}
    rises(tiny, [obj, Unit.channel(spec(tiny)["site"], 3)])


def test_facet_below_the_unit_is_required(tiny_rn, facets):
    facet = facets[tiny_rn.name]
    obj = ov.faceted(Unit.channel("visual.layer1.0", 0), facet)
    with pytest.raises(ValueError, match="does not depend on the facet site"):
        render(tiny_rn, obj, steps=1)


def test_optimization_site_is_the_last_block_before_its_relu(tiny_rn, tiny_vit):
    assert ov.optimization_site(tiny_rn, "visual.layer4") == "visual.layer4.0.act3.pre"
    assert ov.optimization_site(tiny_rn, "visual.layer4.0") == "visual.layer4.0.act3.pre"
    assert ov.optimization_site(tiny_rn, "visual.layer4.0.conv3") == "visual.layer4.0.conv3"  # no ReLU after it
    assert ov.optimization_site(tiny_vit, "visual.transformer.resblocks.1") == "visual.transformer.resblocks.1"
    with pytest.raises(ValueError, match="Did you mean"):
        ov.optimization_site(tiny_rn, "visual.layer9")


def test_visualize_command_writes_one_png_per_unit_a_grid_and_the_trace(tiny_rn, tmp_path, capsys):
    from clipscope.cli import main
    out = tmp_path / "vis"
    assert main(["visualize", "--model", "clipscope-tiny-rn", "--site", "visual.layer4", "--units", "0-2,7",
                 "--steps", "4", "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000_visual.layer4_0.png", "001_visual.layer4_1.png", "002_visual.layer4_2.png",
                    "003_visual.layer4_7.png", "grid.png", "trace.png"]
    printed = capsys.readouterr().out
    assert "4 unit(s) of visual.layer4 (at visual.layer4.0.act3.pre), 4 steps" in printed
    assert Image.open(out / "000_visual.layer4_0.png").size == tuple(tiny_rn.image_size)[::-1]  # the input size


def test_visualize_command_renders_a_prompt_and_rejects_bad_units(tmp_path, capsys):
    from clipscope.cli import main
    assert main(["visualize", "--model", "clipscope-tiny-vit", "--prompt", "a red circle", "--batch", "2",
                 "--steps", "3", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("00*_text_direction*.png"))) == 2
    assert main(["visualize", "--model", "clipscope-tiny-rn", "--site", "visual.layer4", "--units", "0-x"]) == 2
    assert "--units: cannot read '0-x'" in capsys.readouterr().err
    assert main(["visualize", "--model", "clipscope-tiny-rn", "--site", "visual.layer4",
                 "--prompt", "a cat"]) == 2
