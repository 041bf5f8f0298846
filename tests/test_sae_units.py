"""Editing activations and sparse-autoencoder features as units: ``model.edit``, ``model.attach`` (feature
sites), ablating, patching and steering features, and every neuron view on a feature."""
from __future__ import annotations

import pytest
import torch

from clipscope import Unit
from clipscope.hooks import feature_last
from clipscope.model import weights_digest
from clipscope.sae import SparseAutoencoder
from clipscope.validate import InvalidArgumentError

from .conftest import make_images


def _batch(model, n=4):
    return torch.stack([model.preprocess(im) for im in make_images(n)]).to(model.device, model.dtype)


class TestEdit:
    def test_an_identity_edit_changes_nothing(self, tiny):
        x = _batch(tiny)
        plain = tiny.encode_image(x)
        for site in (tiny.layers().blocks()[-2].name, tiny.pre_activation_site(tiny.layers().blocks()[-1].name)):
            with tiny.edit(site, lambda a: a):
                assert torch.equal(tiny.encode_image(x), plain)

    def test_an_edit_of_the_last_resnet_stage_is_the_attention_pool_of_the_edited_map(self, tiny_rn):
        x = _batch(tiny_rn)
        visual = tiny_rn.model.visual
        fn = lambda a: a.flip(-1) * 0.5 + 1  # noqa: E731  (any change of the map that keeps its shape)
        with torch.no_grad():
            with tiny_rn.capture("visual.layer4") as acts:
                tiny_rn.model.encode_image(x)
            expected = visual.attnpool(fn(acts["visual.layer4"]))
            with tiny_rn.edit("visual.layer4", fn):
                got = tiny_rn.model.encode_image(x)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, tiny_rn.model.encode_image(x), atol=1e-3)

    def test_an_edit_of_a_vit_block_feeds_the_next_block(self, tiny_vit):
        x = _batch(tiny_vit)
        visual = tiny_vit.model.visual
        *_, before, last = tiny_vit.layers().blocks().names()

        def fn(a):
            a[:, 0] = 0  # in place on the copy the edit hands over
            return a
        with torch.no_grad():
            with tiny_vit.capture(before) as acts:
                tiny_vit.model.encode_image(x)
            pooled, _ = visual._pool(visual.transformer.resblocks[-1](fn(acts[before])))
            expected = pooled @ visual.proj
            with tiny_vit.edit(before, fn):
                got = tiny_vit.model.encode_image(x)
        assert torch.allclose(got, expected, atol=1e-5)
        assert tiny_vit.site(last).layout == "tokens"

    def test_an_edit_that_changes_the_shape_is_refused_naming_fn(self, tiny_rn):
        with tiny_rn.edit("visual.layer4", lambda a: a[:, :1]), pytest.raises(ValueError, match="fn"):
            tiny_rn.encode_image(_batch(tiny_rn, 1))
        with pytest.raises(ValueError, match="fn"):
            with tiny_rn.edit("visual.layer4", "not a function"):
                pass

    def test_an_edit_that_changes_the_dtype_or_device_is_refused_naming_fn(self, tiny_rn):
        x = _batch(tiny_rn, 1)
        for fn in (lambda a: a.double(), lambda a: a.to("meta")):
            with tiny_rn.edit("visual.layer4", fn), pytest.raises(InvalidArgumentError, match=r"^fn=.*dtype"):
                tiny_rn.encode_image(x)
        site = tiny_rn.attach(random_sae(tiny_rn, "visual.layer3"))
        try:
            with tiny_rn.edit(site, lambda f: f.double()), pytest.raises(InvalidArgumentError, match=r"^fn=.*float64"):
                tiny_rn.encode_image(x)
        finally:
            tiny_rn.detach(site)

    def test_the_edit_ends_with_the_block(self, tiny_rn):
        x = _batch(tiny_rn)
        plain = tiny_rn.encode_image(x)
        with tiny_rn.edit("visual.layer4", torch.zeros_like):
            assert not torch.allclose(tiny_rn.encode_image(x), plain)
        assert torch.equal(tiny_rn.encode_image(x), plain)


def random_sae(model, site: str, n_features: int = 24, seed: int = 0) -> SparseAutoencoder:
    """A ReLU SAE on ``site`` with random weights and a negative encoder bias, so that some features fire
    and some do not on every input."""
    sae = SparseAutoencoder(site, model.site(site).n_units, n_features, activation="relu", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=generator) / sae.d_in ** 0.5)
        sae.b_enc.fill_(-0.2)
        sae.b_dec.copy_(torch.randn(sae.d_in, generator=generator) * 0.1)
    return sae


@pytest.fixture(params=["rn", "vit"])
def attached(request, tiny_rn, tiny_vit):
    """(model, feature site, SAE, base site): a random SAE attached to a conv site (ResNet) or an MLP's
    hidden tokens (ViT), detached after the test."""
    model = tiny_rn if request.param == "rn" else tiny_vit
    base = "visual.layer3" if request.param == "rn" else "visual.transformer.resblocks.0.mlp.c_fc"
    sae = random_sae(model, base)
    site = model.attach(sae)
    yield model, site, sae, base
    model.detach(site)


class TestFeatureSites:
    def test_a_feature_site_is_listed_after_its_base_with_the_base_layout(self, attached):
        model, site, sae, base = attached
        assert site == f"{base}.sae"
        names = model.layers().names()
        assert names.index(site) == names.index(base) + 1 and names.index(f"{site}.pre") == names.index(site) + 1
        info, base_info = model.site(site), model.site(base)
        assert info.module_type == "SparseAutoencoder" and info.layout == base_info.layout and info.n_units == 24
        positions = (slice(1, None) if info.layout == "conv" else slice(None, -1))  # all but the unit axis
        assert info.shape[positions] == base_info.shape[positions]
        assert model.pre_activation_site(site) == f"{site}.pre" and model.sae(site) is sae

    def test_captured_features_are_the_sae_of_the_captured_base(self, attached):
        model, site, sae, base = attached
        x = _batch(model)
        with model.capture([base, site, f"{site}.pre"]) as acts:
            model.encode_image(x)
        layout = model.site(base).layout
        vectors = feature_last(acts[base], layout)
        assert torch.allclose(feature_last(acts[site], layout), sae.encode(vectors), atol=1e-6)
        assert torch.allclose(feature_last(acts[f"{site}.pre"], layout), sae.pre_activation(vectors), atol=1e-6)
        fired = (acts[site] > 0).float().mean()
        assert 0.05 < fired < 0.95  # the test SAE has features both on and off (measured: 0.2-0.5)
        assert torch.equal(model.activations(x, site)[site], acts[site])
        means = model.mean_activations(x, site)[site]
        assert torch.allclose(means, acts[site].mean(0), atol=1e-6)
        values = model.unit_values(site, acts)
        assert values.shape == (len(x), 24)
        assert torch.allclose(values[:, 5], model.read(Unit(site, index=5), acts), atol=1e-6)

    def test_editing_features_without_changing_them_leaves_the_forward_pass_exactly_unchanged(self, attached):
        model, site, sae, _ = attached
        x = _batch(model)
        plain = model.encode_image(x)
        with model.capture(site) as acts:
            model.encode_image(x)
        with model.ablate([Unit(site, index=f) for f in range(24)], value=acts):  # patched with themselves
            assert torch.equal(model.encode_image(x), plain)
        with model.edit(site, lambda f: f):
            assert torch.equal(model.encode_image(x), plain)

    def test_ablating_a_feature_moves_the_base_by_its_activation_times_its_decoder_row(self, attached):
        model, site, sae, base = attached
        x = _batch(model)
        layout = model.site(base).layout
        with model.capture([base, site]) as before:
            model.encode_image(x)
        feature = int(feature_last(before[site], layout).flatten(0, -2).mean(0).argmax())  # one that fires
        with model.ablate(Unit(site, index=feature)), model.capture(base) as after:
            model.encode_image(x)
        f = feature_last(before[site], layout)[..., feature:feature + 1]
        expected = feature_last(before[base], layout) - f * sae.decoder_direction(feature).detach()
        assert torch.allclose(feature_last(after[base], layout), expected, atol=1e-5)
        assert f.abs().max() > 0.01  # the feature fires (measured: 0.034 on the tiny ResNet)

    def test_patching_features_from_other_images_moves_the_base_by_the_decoded_difference(self, attached):
        model, site, sae, base = attached
        x, other = _batch(model), _batch(model)[[1, 2, 3, 0]]
        layout = model.site(base).layout
        with model.capture([base, site]) as here:
            model.encode_image(x)
        with model.capture(site) as there:
            model.encode_image(other)
        units = [Unit(site, index=f) for f in (0, 3, 7)]
        with model.ablate(units, value=there), model.capture(base) as patched:
            model.encode_image(x)
        delta = torch.zeros_like(feature_last(here[site], layout))
        delta[..., [0, 3, 7]] = (feature_last(there[site], layout) - feature_last(here[site], layout))[..., [0, 3, 7]]
        expected = feature_last(here[base], layout) + sae.decode(delta) - sae.decode(torch.zeros_like(delta))
        assert torch.allclose(feature_last(patched[base], layout), expected.detach(), atol=1e-5)

    def test_steering_adds_the_write_direction(self, attached):
        model, site, sae, base = attached
        x = _batch(model)
        layout = model.site(base).layout
        with model.capture(base) as plain:
            model.encode_image(x)
        n = model.site(base).n_units
        direction = torch.randn(n)
        cases = [(Unit(site, index=4), sae.decoder_direction(4).detach()),
                 (Unit(base, index=2), torch.nn.functional.one_hot(torch.tensor(2), n).float()),
                 (Unit.along(base, direction), direction / direction.norm())]
        for unit, write in cases:
            with model.steer(unit, 3.0), model.capture(base) as steered:
                model.encode_image(x)
            expected = feature_last(plain[base], layout) + 3.0 * write
            assert torch.allclose(feature_last(steered[base], layout), expected, atol=1e-5), unit

    def test_steering_one_token_or_position_changes_only_there(self, attached):
        model, site, sae, base = attached
        x = _batch(model, 2)
        layout = model.site(base).layout
        unit = Unit.channel(site, 4, position=(0, 1)) if layout == "conv" else Unit.neuron(site, 4, token=3)
        with model.capture(base) as plain:
            model.encode_image(x)
        with model.steer(unit, 2.0), model.capture(base) as steered:
            model.encode_image(x)
        change = feature_last(steered[base] - plain[base], layout)
        where = (slice(None), 0, 1) if layout == "conv" else (slice(None), 3)
        assert torch.allclose(change[where], 2.0 * sae.decoder_direction(4).detach().expand_as(change[where]),
                              atol=1e-5)
        change[where] = 0
        assert change.abs().max() == 0


class TestAttachRefusals:
    def test_an_sae_of_a_site_the_model_lacks_is_refused_naming_sae_site(self, tiny_rn):
        with pytest.raises(InvalidArgumentError, match=r"sae\.site.*visual\.layer3"):
            tiny_rn.attach(SparseAutoencoder("visual.layer33", 128, 8, k=2))

    def test_an_sae_of_another_width_is_refused_naming_sae_d_in_and_the_width(self, tiny_rn):
        width = tiny_rn.site("visual.layer3").n_units
        with pytest.raises(InvalidArgumentError, match=rf"sae\.d_in.*{width}"):
            tiny_rn.attach(SparseAutoencoder("visual.layer3", width + 1, 8, k=2))

    def test_a_name_in_use_and_unknown_detaches_are_refused(self, tiny_rn):
        width = tiny_rn.site("visual.layer3").n_units
        site = tiny_rn.attach(SparseAutoencoder("visual.layer3", width, 8, k=2))
        try:
            with pytest.raises(InvalidArgumentError, match="name"):
                tiny_rn.attach(SparseAutoencoder("visual.layer3", width, 8, k=2))
            for tool in (tiny_rn.ablate, lambda units: tiny_rn.steer(units, 1.0)):
                with pytest.raises(InvalidArgumentError, match=r"^units=.*pre-activations"):
                    with tool(Unit.channel(f"{site}.pre", 0)):
                        pass
            with pytest.raises(InvalidArgumentError, match="attached feature site"):
                tiny_rn.detach("visual.layer3")
        finally:
            tiny_rn.detach(site)
        assert site not in tiny_rn.layers().names()
        with pytest.raises(InvalidArgumentError, match="attached: none"):
            tiny_rn.detach(site)


    def test_names_that_clash_with_site_suffixes_are_refused(self, tiny_rn):
        width = tiny_rn.site("visual.layer3").n_units
        for name in ("pre", "v", "pattern", "z", "result", "resid_pre", "resid_mid", "resid_post"):
            with pytest.raises(InvalidArgumentError, match=r"^name="):
                tiny_rn.attach(SparseAutoencoder("visual.layer3", width, 8, k=2), name)
        assert not [n for n in tiny_rn.layers().names() if n.startswith("visual.layer3.")
                    and tiny_rn.site(n).point in ("features", "pre_features")]


class TestAttachLeavesTheSAEAsItWas:
    def test_detach_restores_requires_grad_after_the_last_of_two_attachments(self, tiny_rn):
        sae = random_sae(tiny_rn, "visual.layer3")
        sae.b_dec.requires_grad_(False)  # the user's own choice, kept
        first, second = tiny_rn.attach(sae, "one"), tiny_rn.attach(sae, "two")
        assert not any(p.requires_grad for p in sae.parameters())
        tiny_rn.detach(first)
        assert not any(p.requires_grad for p in sae.parameters())  # still attached as "two"
        tiny_rn.detach(second)
        assert {n: p.requires_grad for n, p in sae.named_parameters()} == \
            {"W_dec": True, "W_enc": True, "b_enc": True, "b_dec": False}
        assert sae.W_dec.device.type == "cpu"

    def test_the_id_follows_weights_changed_in_place_while_attached(self, tiny_rn):
        sae = random_sae(tiny_rn, "visual.layer3")
        plain = tiny_rn.id
        site = tiny_rn.attach(sae)
        try:
            attached = tiny_rn.id
            assert attached != plain and tiny_rn.id == attached
            saved = sae.b_enc.detach().clone()
            with torch.no_grad():
                sae.b_enc.add_(0.5)
            changed = tiny_rn.id
            assert changed != attached
            with torch.no_grad():
                sae.b_enc.copy_(saved)
            assert tiny_rn.id == attached  # a digest of the contents: the same weights, the same id
            twin = random_sae(tiny_rn, "visual.layer3")
            assert weights_digest(twin) == weights_digest(sae)
            with torch.no_grad():
                twin.W_dec[0, 0] += 1
            assert weights_digest(twin) != weights_digest(sae)
        finally:
            tiny_rn.detach(site)
        assert tiny_rn.id == plain


# ------------------------------------------------------------------------------------------------------
# Every neuron view on a feature whose answer is known: an SAE whose feature f IS neuron perm[f].

BASE = "visual.layer4"
#: The organism's most selective word unit (README: visual.layer4 503, "purple").
NEURON = 503


@pytest.fixture(scope="module")
def neuron_sae(organism):
    """``(feature site, feature index)``: an SAE on the organism's last stage (its output is post-ReLU)
    whose encoder and decoder rows are the channels' basis vectors in a shuffled order, ReLU, no biases:
    feature f's activation is exactly channel ``perm[f]``'s, and its decoder direction that channel's."""
    n = organism.site(BASE).n_units
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    sae = SparseAutoencoder(BASE, n, n, activation="relu")
    eye = torch.eye(n)
    with torch.no_grad():
        sae.W_enc.copy_(eye[:, perm])
        sae.W_dec.copy_(eye[perm])
    site = organism.attach(sae, "neurons")
    yield site, int((perm == NEURON).nonzero())
    organism.detach(site)


@pytest.fixture(scope="module")
def scenes():
    from clipscope.organism.scenes import generate
    return [s.image for s in generate(48, seed=9_100_000)]  # a seed block used by no other test


WORDS = ["purple", "orange", "red", "circle", "square", "apple", "house", "star"]
CONCEPTS = ["purple", "orange", "red", "blue", "circle", "square", "triangle", "star"]


def assert_same_ranking(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    """The same names in the same order, with the same scores to float rounding."""
    assert [name for name, _ in a] == [name for name, _ in b]
    assert [score for _, score in a] == pytest.approx([score for _, score in b], abs=1e-5)


@pytest.mark.usefixtures("one_thread")
class TestAFeatureThatIsANeuron:
    def test_capture_ablation_and_steering_equal_the_neurons(self, organism, neuron_sae, scenes):
        site, feature = neuron_sae
        x = torch.stack([organism.preprocess(im) for im in scenes[:8]])
        acts = organism.activations(x, [site, BASE])
        assert torch.equal(acts[site][:, feature], acts[BASE][:, NEURON])
        assert acts[BASE][:, NEURON].max() > 0.5  # the unit fires on some of these scenes
        for edit in (lambda u: organism.ablate(u), lambda u: organism.steer(u, 2.0)):
            with edit(Unit.channel(site, feature)):
                via_feature = organism.encode_image(x)
            with edit(Unit.channel(BASE, NEURON)):
                via_neuron = organism.encode_image(x)
            assert torch.allclose(via_feature, via_neuron, atol=1e-6)
            assert not torch.allclose(via_feature, organism.encode_image(x), atol=1e-4)

    def test_dataset_examples_words_and_labels_equal_the_neurons(self, organism, neuron_sae, scenes):
        from clipscope.neurons import dataset_examples, label_units, word_responses
        site, feature = neuron_sae
        mined = dataset_examples(organism, scenes, [site, BASE], k=4, units={site: [feature], BASE: [NEURON]},
                                 progress=False)
        assert mined.top(site, feature) == mined.top(BASE, NEURON)
        assert mined.bottom(site, feature) == mined.bottom(BASE, NEURON)
        words = word_responses(organism, [site, BASE], WORDS, n_variants=2, progress=False)
        assert words.top(site, feature, 8) == words.top(BASE, NEURON, 8)
        assert words.top(site, feature, 1)[0][0] == "purple"  # the planted answer for this unit
        labels = [label_units(organism, s, scenes, CONCEPTS, units=[u], templates=None, progress=False)
                  for s, u in ((site, feature), (BASE, NEURON))]
        assert_same_ranking(labels[0].top(feature), labels[1].top(NEURON))

    def test_feature_visualization_optimizes_the_pre_activation_as_the_neuron(self, organism, neuron_sae):
        from clipscope import optvis
        site, feature = neuron_sae
        assert optvis.optimization_site(organism, site) == f"{site}.pre"
        via_feature = optvis.render(organism, Unit.channel(site, feature), steps=6, progress=False)
        # the neuron read at its own site (post-ReLU): the feature's pre-activation is exactly that value
        via_neuron = optvis.render(organism, Unit.channel(BASE, NEURON), steps=6, exact_site=True, progress=False)
        assert torch.allclose(via_feature.trace, via_neuron.trace, atol=1e-5)
        assert torch.allclose(via_feature.images, via_neuron.images, atol=1e-5)
        assert via_feature.trace[-1, 0] > via_feature.trace[0, 0]

    def test_the_atlas_and_the_explorer_show_the_neurons_views(self, organism, neuron_sae, scenes):
        from clipscope.neurons import Atlas
        from clipscope.widgets import NeuronExplorer
        site, feature = neuron_sae
        atlas = Atlas(organism, scenes, words=WORDS, concepts=CONCEPTS, k=4, steps=2, n_variants=2, progress=False)
        a, b = atlas.view(site, feature), atlas.view(BASE, NEURON)
        assert a.examples == b.examples and a.words == b.words
        assert_same_ranking(a.labels, b.labels)
        explorer = NeuronExplorer(atlas, sites=[BASE, site], site=site, unit=feature)
        assert f"{site}" in explorer.panel_a.title.value and f"unit {feature}" in explorer.panel_a.title.value
        explorer.render()
        assert atlas.visualization(site, feature) is not None
