"""Dataset-example mining: correctness against brute force, one pass, skipping, resuming, layouts."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from clipscope.hooks import feature_last
from clipscope.neurons import dataset_examples
from clipscope.organism import COLOURS
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

N_PER_COLOUR = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes():
    from clipscope.organism.scenes import SHAPES, object_scene
    out = []
    for i in range(N_PER_COLOUR):
        for j, colour in enumerate(COLOURS):
            out.append(object_scene(shape=SHAPES[(i + j) % len(SHAPES)], colour=colour, seed=1000 + 7 * i + j))
    return out


@pytest.fixture(scope="module")
def colour_units(organism):
    from clipscope.organism.properties import unit_selectivity
    best = unit_selectivity(organism, n_objects=120, n_words=24).best
    return {c: best[f"colour:{c}"] for c in COLOURS}


def count_encodes(monkeypatch, model) -> list[int]:
    calls = [0]
    original = model.model.encode_image

    def counted(x, *a, **kw):
        calls[0] += 1
        return original(x, *a, **kw)
    monkeypatch.setattr(model.model, "encode_image", counted)
    return calls


def brute_force(model, images, site, units, k, batch_size):
    """Capture every activation, sort: the reference the streaming pass must match."""
    with torch.no_grad(), model.capture(site) as acts:
        model.encode_image(list(images), batch_size=batch_size, progress=False)
    layout = model.site(site).layout
    view = feature_last(acts[site], layout)
    flat = view.reshape(view.shape[0], -1, view.shape[-1]).float()
    pooled = flat[:, model.prefix_tokens:] if layout == "tokens" else flat  # the default token_pool: patch tokens
    means = pooled.mean(dim=1).cpu()
    flat = flat.cpu()
    out = {}
    for u in units:
        top = torch.sort(means[:, u], descending=True, stable=True).indices[:k]
        bottom = torch.sort(means[:, u], stable=True).indices[:k]
        out[u] = (top.tolist(), means[top, u], flat[top, :, u].argmax(dim=1).tolist(),
                  bottom.tolist(), means[bottom, u], flat[bottom, :, u].argmin(dim=1).tolist())
    return out


def flat_positions(examples, grid):
    return [p[0] * grid[1] + p[1] if isinstance(p, tuple) else p for p in (e.position for e in examples)]


def assert_same(a, b):
    for name in a.sites:
        sa, sb = a.sites[name], b.sites[name]
        assert sa.units == sb.units
        assert sa.top_keys == sb.top_keys and sa.bottom_keys == sb.bottom_keys
        assert torch.equal(sa.top_values, sb.top_values) and torch.equal(sa.bottom_values, sb.bottom_values)
        assert torch.equal(sa.top_positions, sb.top_positions)
        assert torch.equal(sa.bottom_positions, sb.bottom_positions)
    assert a.n_seen == b.n_seen and a.skipped == b.skipped


def test_colour_units_find_their_colour(organism, scenes, colour_units):
    images = [s.image for s in scenes]
    by_site: dict[str, list[int]] = {}
    for score in colour_units.values():
        by_site.setdefault(score.layer, []).append(score.channel)
    result = dataset_examples(organism, images, list(by_site), k=16, units=by_site, batch_size=32, progress=False)
    assert result.n_seen == len(images)
    for colour, score in colour_units.items():
        top = result.top(score.layer, score.channel)
        assert len(top) == 16
        hits = sum(scenes[ex.key].meta["colour"] == colour for ex in top)
        assert hits >= 12, (colour, hits)
        bottom = result.bottom(score.layer, score.channel)
        assert sum(scenes[ex.key].meta["colour"] == colour for ex in bottom) <= 2
        assert top[0].value >= top[-1].value > bottom[-1].value >= bottom[0].value


def test_matches_brute_force_one_pass(organism, scenes, colour_units, monkeypatch):
    images = [s.image for s in scenes[:70]]
    site, k, bs = "visual.layer3", 8, 16
    units = [colour_units["blue"].channel, 0, 5, 255]
    ref = brute_force(organism, images, site, units, k, bs)
    calls = count_encodes(monkeypatch, organism)
    result = dataset_examples(organism, images, [site, "visual.layer4"], k=k, units={site: units}, batch_size=bs,
                              progress=False)
    assert calls[0] == -(-len(images) // bs)           # one pass over the data for both sites
    grid = result.sites[site].grid
    assert grid == (4, 4)
    for u in units:
        t_keys, t_vals, t_pos, b_keys, b_vals, b_pos = ref[u]
        top, bottom = result.top(site, u), result.bottom(site, u)
        assert [e.key for e in top] == t_keys and [e.key for e in bottom] == b_keys
        # same numbers up to float summation order (the pass reduces only the selected units)
        torch.testing.assert_close(torch.tensor([e.value for e in top]), t_vals, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.tensor([e.value for e in bottom]), b_vals, rtol=1e-6, atol=1e-7)
        assert flat_positions(top, grid) == t_pos and flat_positions(bottom, grid) == b_pos
        assert all(isinstance(e.position, tuple) and len(e.position) == 2 for e in top)
    # all units of layer4 (units given only for layer3)
    l4 = result.sites["visual.layer4"]
    assert l4.units == list(range(512)) and l4.top_values.shape == (512, k)
    ref4 = brute_force(organism, images, "visual.layer4", [7, 300], k, bs)
    for u in (7, 300):
        assert [e.key for e in result.top("visual.layer4", u)] == ref4[u][0]
    frame = result.to_frame()
    assert len(frame) == (len(units) + 512) * 2 * k
    assert "unit" in frame.columns and "<table" in result._repr_html_()


def test_unreadable_images_skipped_and_counted(organism, scenes, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, s in enumerate(scenes[:20]):
        s.image.save(folder / f"img_{i:02d}.png")
    (folder / "img_05b.png").write_bytes(b"not a png")
    (folder / "img_11b.png").write_bytes(b"")
    result = dataset_examples(organism, folder, "visual.layer4", k=4, units=[1, 2], batch_size=8, progress=False)
    assert result.n_seen == 20 and result.n_skipped == 2
    assert sorted(k.rsplit("/", 1)[-1] for k, _ in result.skipped) == ["img_05b.png", "img_11b.png"]
    assert all(str(e.key).startswith(str(folder)) for e in result.top("visual.layer4", 1))  # keys are paths
    fig = result.plot("visual.layer4", 1, n=4)
    assert len([a for a in fig.axes if a.images]) == 4
    with pytest.raises(ValueError, match="not mined"):
        result.top("visual.layer4", 3)


class FailingList(list):
    """A source that breaks (like a lost network share) after ``fail_after`` items."""

    def __init__(self, items, fail_after):
        super().__init__(items)
        self.fail_after = fail_after

    def __iter__(self):
        for i, item in enumerate(super().__iter__()):
            if i == self.fail_after:
                raise OSError("share went away")
            yield item


def test_interrupted_run_resumes_from_cache(organism, scenes, tmp_path, monkeypatch):
    images = [s.image for s in scenes[:72]]
    kw = dict(k=6, units={"visual.layer3": [17, 47], "visual.layer4": [319, 3]}, batch_size=8, progress=False)
    sites = ["visual.layer3", "visual.layer4"]
    full = dataset_examples(organism, images, sites, **kw)
    calls = count_encodes(monkeypatch, organism)
    with pytest.raises(OSError, match="went away"):
        dataset_examples(organism, FailingList(images, 30), sites, cache_dir=tmp_path, checkpoint_every=2, **kw)
    done_before = calls[0]
    assert done_before == 3                       # items 0..29: three full batches of 8
    assert len(list(tmp_path.glob("examples_*.pt"))) == 2
    calls[0] = 0
    resumed = dataset_examples(organism, images, sites, cache_dir=tmp_path, **kw)
    assert calls[0] == 9 - done_before            # only the rest was encoded
    assert_same(resumed, full)
    calls[0] = 0
    again = dataset_examples(organism, images, sites, cache_dir=tmp_path, **kw)
    assert calls[0] == 0
    assert_same(again, full)
    # a different data set does not reuse the cache
    other = dataset_examples(organism, images[:40], sites, cache_dir=tmp_path, **kw)
    assert calls[0] == 5 and other.n_seen == 40


def test_stream_with_fingerprint_resumes(organism, scenes, tmp_path, monkeypatch):
    images = [s.image for s in scenes[:40]]

    def stream(fail_after=None):
        for i, im in enumerate(images):
            if i == fail_after:
                raise KeyboardInterrupt
            yield im
    kw = dict(k=4, units=[1, 2, 3], batch_size=8, progress=False)
    full = dataset_examples(organism, stream(), "visual.layer4", **kw)
    with pytest.warns(UserWarning, match="fingerprint"):
        dataset_examples(organism, stream(), "visual.layer4", cache_dir=tmp_path, **kw)
    calls = count_encodes(monkeypatch, organism)
    with pytest.raises(KeyboardInterrupt):
        dataset_examples(organism, stream(20), "visual.layer4", cache_dir=tmp_path, fingerprint="s1",
                         checkpoint_every=100, **kw)
    assert calls[0] == 2
    calls[0] = 0
    resumed = dataset_examples(organism, stream(), "visual.layer4", cache_dir=tmp_path, fingerprint="s1", **kw)
    assert calls[0] == 3
    assert_same(resumed, full)


def test_tiny_vit_token_positions(tiny_vit):
    images = make_images(30, seed=3)
    site = "visual.transformer.resblocks.0"
    assert tiny_vit.site(site).layout == "tokens"
    n_tokens, width = tiny_vit.site(site).shape
    ref = brute_force(tiny_vit, images, site, range(width), 5, 8)
    result = dataset_examples(tiny_vit, images, site, k=5, batch_size=8, progress=False)
    se = result.sites[site]
    assert se.grid == (n_tokens,)
    for u in range(width):
        top, bottom = result.top(site, u), result.bottom(site, u)
        assert [e.key for e in top] == ref[u][0] and [e.key for e in bottom] == ref[u][3]
        assert [e.position for e in top] == ref[u][2] and [e.position for e in bottom] == ref[u][5]
        assert all(isinstance(e.position, int) and 0 <= e.position < n_tokens for e in top)
    positions = {e.position for u in range(width) for e in result.top(site, u)}
    assert len(positions) > 1                      # not always the class token
    fig = result.plot(site, 0, n=3)
    assert len([a for a in fig.axes if a.images]) == 3


def test_fewer_images_than_k_and_bad_units(tiny_rn):
    images = make_images(3)
    site = next(n for n in tiny_rn.layers().names() if n.startswith("visual.layer") and tiny_rn.site(n).layout == "conv")
    result = dataset_examples(tiny_rn, images, site, k=5, units=[0], progress=False)
    top = result.top(site, 0)
    assert sorted(e.key for e in top) == [0, 1, 2]
    assert [e.value for e in top] == sorted((e.value for e in top), reverse=True)
    assert len(result.top(site, 0)) == 3 and len(result.bottom(site, 0)) == 3
    with pytest.raises(ValueError, match="out of range"):
        dataset_examples(tiny_rn, images, site, units=[10_000], progress=False)
    with pytest.raises(ValueError, match="text-tower"):
        dataset_examples(tiny_rn, images, "text.transformer", progress=False)


def test_datasets_tables_and_streams_give_the_same_examples_as_a_list(organism, scenes, colour_units, tmp_path):
    import datasets
    images = [s.image for s in scenes[:60]]
    site = colour_units["red"].layer
    units = [colour_units[c].channel for c in ("red", "blue")]
    reference = dataset_examples(organism, images, site, k=5, units=units, batch_size=16, progress=False)
    table = datasets.Dataset.from_dict({"image": images, "label": list(range(60))},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))
    from_table = dataset_examples(organism, table, site, k=5, units=units, batch_size=16, progress=False,
                                  cache_dir=tmp_path)
    stream = table.to_iterable_dataset()
    from_stream = dataset_examples(organism, stream, site, k=5, units=units, batch_size=16, progress=False)
    for result in (from_table, from_stream):
        for u in units:
            assert [e.key for e in result.top(site, u)] == [e.key for e in reference.top(site, u)]
            torch.testing.assert_close([e.value for e in result.top(site, u)],
                                       [e.value for e in reference.top(site, u)], rtol=1e-4, atol=1e-5)
    # the table's own fingerprint keys the cache, and the images load back from the table
    assert len(list(tmp_path.glob("examples_*.pt"))) == 1
    top = from_table.top(site, units[0])[0]
    assert from_table.load([top.key])[0].size == tuple(organism.image_size)[::-1]


def test_preprocessed_tensors_give_the_same_examples_and_resume(organism, scenes, tmp_path, monkeypatch):
    images = [s.image for s in scenes[:40]]
    tensor = torch.stack([organism.preprocess(im) for im in images])
    kw = dict(k=5, units=[319, 17, 3], batch_size=16, progress=False)
    reference = dataset_examples(organism, images, "visual.layer4", **kw)
    from_tensor = dataset_examples(organism, tensor, "visual.layer4", **kw)
    assert_same(from_tensor, reference)
    # an interrupted pass over a tensor resumes in the middle of it
    original = organism.model.encode_image
    encoded = []

    def fail_on_third_batch(x, *args, **kwargs):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(len(x))
        return original(x, *args, **kwargs)
    monkeypatch.setattr(organism.model, "encode_image", fail_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        dataset_examples(organism, tensor, "visual.layer4", cache_dir=tmp_path, checkpoint_every=1, **kw)
    assert encoded == [16, 16]
    monkeypatch.setattr(organism.model, "encode_image", original)
    calls = count_encodes(monkeypatch, organism)
    resumed = dataset_examples(organism, tensor, "visual.layer4", cache_dir=tmp_path, **kw)
    assert calls[0] == 1                               # only the last batch (8 images) was left
    assert_same(resumed, from_tensor)
    # a tensor at another resolution is skipped image by image, with the reason
    small = torch.zeros(4, 3, 32, 32)
    result = dataset_examples(organism, small, "visual.layer4", **kw)
    assert result.n_seen == 0 and result.n_skipped == 4
    assert "pass PIL images" in result.skipped[0][1]


def test_no_examples_are_cached_while_the_model_is_edited(organism, scenes, tmp_path):
    # the model id does not describe an edit: examples cached under it would be served for the plain model
    images = [s.image for s in scenes[:4]]
    with organism.edit("visual.layer4", lambda a: a * 0):
        with pytest.raises(InvalidArgumentError, match="cache_dir"):
            dataset_examples(organism, images, "visual.layer4", k=2, cache_dir=tmp_path, progress=False)
        assert dataset_examples(organism, images, "visual.layer4", k=2, progress=False).n_seen == 4
    assert not any(tmp_path.iterdir())
