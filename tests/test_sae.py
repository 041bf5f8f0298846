"""Sparse autoencoders (clipscope.sae): the autoencoder, training, the activation buffer and the metrics.

Known answers: a planted sparse dictionary is recovered; an SAE on an organism site reaches measured
explained-variance targets; an interrupted buffer resumes to the same shards and the same SAE; splicing an
exact reconstruction leaves zero-shot accuracy unchanged and splicing a zeroed SAE destroys it.
"""
from __future__ import annotations

import pytest
import torch

from clipscope.organism import SHAPES, ZERO_SHOT_TEMPLATES
from clipscope.organism.scenes import generate
from clipscope.sae import SparseAutoencoder, evaluate_sae, train_on_rows, train_sae
from clipscope.sae.buffer import ActivationBuffer, site_rows
from clipscope.sae.train import geometric_median
from clipscope.validate import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

SITE = "visual.layer3"      # the ResNet organism's (256, 4, 4) stage: 16 rows per image


def planted(n: int, d: int = 32, m: int = 64, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows that are k-sparse positive combinations (weights in [0.5, 1.5]) of ``m`` random unit
    directions in ``d`` dimensions; returns ``(rows, directions)``."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, m, generator=g).argsort(dim=1)[:, :k]
    codes = torch.zeros(n, m).scatter(1, chosen, 0.5 + torch.rand(n, k, generator=g))
    return codes @ directions, directions


def explained_variance(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(1 - (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def mean_max_cosine(sae: SparseAutoencoder, directions: torch.Tensor) -> float:
    """For each planted direction, the best cosine with a decoder row; the mean over directions."""
    return float((directions @ sae.W_dec.detach().T).max(dim=1).values.mean())


@pytest.fixture(scope="module")
def scenes() -> list:
    return [s.image for s in generate(300, seed=11)]


@pytest.fixture(scope="module")
def labelled() -> tuple[list, list[str]]:
    objects = list(generate(120, seed=77, kind="object"))
    return [s.image for s in objects], [s.meta["shape"] for s in objects]


# -- the autoencoder ---------------------------------------------------------------------------------


class TestAutoencoder:
    def test_topk_keeps_k_and_works_on_any_leading_shape(self):
        sae = SparseAutoencoder("s", 8, 32, k=4, seed=1)
        x = torch.randn(2, 5, 8)
        f = sae.encode(x)
        assert f.shape == (2, 5, 32) and bool((f >= 0).all())
        assert int((f > 0).sum(-1).max()) <= 4
        assert torch.allclose(sae(x), sae(x.reshape(10, 8)).reshape(2, 5, 8), atol=1e-6)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
        assert torch.equal(sae.W_enc.detach(), sae.W_dec.detach().T)   # encoder starts as the decoder's transpose

    def test_formulas_and_decoder_direction(self):
        sae = SparseAutoencoder("s", 6, 10, activation="relu", input_scale=2.5, seed=3)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
        x = torch.randn(7, 6)
        pre = (x * 2.5 - sae.b_dec) @ sae.W_enc + sae.b_enc
        assert torch.allclose(sae.pre_activation(x), pre)
        f = torch.relu(pre)
        assert torch.allclose(sae(x), (f @ sae.W_dec + sae.b_dec) / 2.5, atol=1e-6)
        one = torch.zeros(10)
        one[4] = 1.0
        assert torch.allclose(sae.decode(one) - sae.decode(torch.zeros(10)), sae.decoder_direction(4), atol=1e-6)

    def test_fold_decoder_norms_keeps_the_reconstruction(self):
        sae = SparseAutoencoder("s", 6, 10, activation="relu")
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(10, 1) * 3 + 0.1)
        x = torch.randn(50, 6)
        before = sae(x).detach()
        sae.fold_decoder_norms()
        assert torch.allclose(sae(x), before, atol=1e-5)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)

    def test_save_load_round_trip(self, tmp_path):
        sae = SparseAutoencoder("visual.layer3", 16, 40, k=5, input_scale=0.7, tokens="all", seed=2)
        with torch.no_grad():
            sae.b_dec.normal_()
        sae.save(tmp_path / "sae")
        assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["sae.json", "sae.safetensors"]
        back = SparseAutoencoder.load(tmp_path / "sae")
        assert back.config() == sae.config()
        x = torch.randn(9, 16)
        assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))

    def test_load_refuses_other_folders(self, tmp_path):
        with pytest.raises(InvalidArgumentError, match="folder"):
            SparseAutoencoder.load(tmp_path)
        (tmp_path / "sae.json").write_text('{"format": "something else"}')
        with pytest.raises(InvalidArgumentError, match="folder"):
            SparseAutoencoder.load(tmp_path)

    def test_geometric_median_resists_an_outlier(self):
        x = torch.cat([torch.zeros(20, 3), torch.full((1, 3), 1000.0)])
        assert float(geometric_median(x).norm()) < 1e-2 < float(x.mean(0).norm())


# -- training: known answers ---------------------------------------------------------------------------


def test_topk_recovers_a_planted_dictionary():
    x, directions = planted(8000, seed=100)   # not seed 0: the SAE's own initial directions come from seed 0
    sae, log = train_on_rows(x, n_features=64, k=3, epochs=10, batch_size=256, seed=0, progress=False)
    # measured: mean max cosine 0.958 (52 of 64 directions above 0.9; 0.778 after 4 epochs), explained
    # variance 0.89; the untrained dictionary scores 0.41
    assert mean_max_cosine(sae, directions) > 0.9
    assert explained_variance(sae, x) > 0.8
    assert log.history[-1]["l0"] == 3.0
    untrained = SparseAutoencoder("rows", 32, 64, k=3, seed=0)
    assert mean_max_cosine(untrained, directions) < 0.5


def test_relu_baseline_recovers_a_planted_dictionary():
    x, directions = planted(8000, seed=100)
    sae, _ = train_on_rows(x, n_features=64, activation="relu", l1=1.0, epochs=10, batch_size=256, seed=0,
                           progress=False)
    # measured: mean max cosine 0.772 (TopK: 0.958; untrained: 0.41), explained variance 0.84, L0 16.4
    assert mean_max_cosine(sae, directions) > 0.7
    assert explained_variance(sae, x) > 0.75
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # norms folded into the encoder


def test_trained_on_an_organism_site_reaches_targets(organism, scenes, tmp_path):
    sae, log = train_sae(organism, scenes, SITE, n_features=512, k=16, epochs=3, batch_size=256,
                         buffer_dir=tmp_path, progress=False)
    assert log.rows_per_epoch == 300 * 16 and log.n_images == 300
    held_out = [s.image for s in generate(100, seed=12)]
    result = evaluate_sae(organism, sae, held_out, progress=False)
    # measured on held-out scenes: explained variance 0.88, L0 16.0, 48 dead and 40 dense (>10%) of 512
    assert result.explained_variance > 0.8
    assert result.mean_l0 <= 16
    assert result.n_rows == 1600
    assert len(result.dead) < 128


# -- the buffer --------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_interrupted_buffer_resumes_to_the_same_shards_and_sae(organism, scenes, tmp_path):
    images = scenes[:120]
    kwargs = dict(n_features=128, k=8, epochs=2, batch_size=128, images_per_shard=32, image_batch_size=16,
                  seed=4, progress=False)
    whole, _ = train_sae(organism, images, SITE, buffer_dir=tmp_path / "whole", **kwargs)

    def stop_after_two(index: int) -> None:
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_sae(organism, images, SITE, buffer_dir=tmp_path / "cut", on_shard=stop_after_two, **kwargs)
    (folder,) = (tmp_path / "cut").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    written = []
    resumed, log = train_sae(organism, images, SITE, buffer_dir=tmp_path / "cut", on_shard=written.append, **kwargs)
    assert written == [2, 3]                                # resumed at the first missing shard
    assert log.rows_per_epoch == 120 * 16
    cut = ActivationBuffer(folder, 32)
    full = ActivationBuffer(next((tmp_path / "whole").iterdir()), 32)
    for i in range(4):
        assert torch.equal(cut.read_shard(i), full.read_shard(i))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    again = []
    train_sae(organism, images, SITE, buffer_dir=tmp_path / "cut", on_shard=again.append, **kwargs)
    assert again == []                                      # a complete buffer is reused


def test_buffer_rows_are_the_site_rows(organism, scenes, tmp_path):
    images = scenes[:10]
    buffer = ActivationBuffer.open(organism, images, SITE, tokens="all", buffer_dir=tmp_path, images_per_shard=4)
    manifest = buffer.fill(organism, images, SITE, tokens="all", image_batch_size=3)
    assert manifest["n_shards"] == 3 and manifest["n_rows"] == 160
    x = torch.stack([organism.preprocess(im) for im in images])
    acts = organism.activations(x, [SITE])[SITE]
    expected = site_rows(acts, "conv")
    assert torch.allclose(torch.cat([buffer.read_shard(i) for i in range(3)]), expected, atol=1e-5)
    # row r is image r // 16, position (y, x) = divmod(r % 16, 4)
    assert torch.equal(expected[16 * 2 + 4 * 1 + 3], acts[2, :, 1, 3])


def test_training_is_deterministic_given_the_seed(organism, scenes):
    kwargs = dict(n_features=64, k=4, batch_size=128, image_batch_size=32, shuffle_rows=512, progress=False)
    a, _ = train_sae(organism, scenes[:60], SITE, seed=1, **kwargs)
    b, _ = train_sae(organism, scenes[:60], SITE, seed=1, **kwargs)
    c, _ = train_sae(organism, scenes[:60], SITE, seed=2, **kwargs)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.b_dec, b.b_dec)
    assert not torch.equal(a.W_dec, c.W_dec)


# -- metrics ---------------------------------------------------------------------------------------------


def exact_sae(site: str, d: int) -> SparseAutoencoder:
    """A ReLU SAE whose reconstruction is exactly its input: features ``relu(x)`` and ``relu(-x)``."""
    sae = SparseAutoencoder(site, d, 2 * d, activation="relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae



def test_a_save_interrupted_between_its_two_files_is_refused(tmp_path):
    import json
    import shutil
    old = exact_sae("visual.layer3", 16)
    old.save(tmp_path)
    new = SparseAutoencoder("visual.layer3", 16, 16, activation="topk", k=4, input_scale=2.0)
    new.save(tmp_path / "next")
    shutil.copyfile(tmp_path / "next" / "sae.safetensors", tmp_path / "sae.safetensors")   # killed before sae.json
    with pytest.raises(InvalidArgumentError, match="interrupted"):
        SparseAutoencoder.load(tmp_path)
    assert json.loads((tmp_path / "next" / "sae.json").read_text())["k"] == 4
    assert SparseAutoencoder.load(tmp_path / "next").k == 4                       # a whole pair loads


def test_no_activation_buffer_is_written_while_the_model_is_edited(organism, scenes, tmp_path):
    # the model id does not describe an edit: rows buffered under it would be reused for the plain model
    with organism.edit("visual.layer3", lambda a: a * 0):
        with pytest.raises(InvalidArgumentError, match="buffer_dir"):
            train_sae(organism, scenes[:8], "visual.layer3", n_features=16, k=2, buffer_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())

def test_downstream_accuracy_with_exact_and_zeroed_reconstructions(organism, labelled):
    images, labels = labelled
    kwargs = dict(labels=labels, classes=list(SHAPES), templates=list(ZERO_SHOT_TEMPLATES), progress=False)
    exact = evaluate_sae(organism, exact_sae("visual.layer4", 512), images, **kwargs)
    independent = organism.zero_shot(images, list(SHAPES), list(ZERO_SHOT_TEMPLATES), progress=False)
    truth = torch.tensor([SHAPES.index(y) for y in labels])
    assert exact.accuracy == pytest.approx(float((independent.top1 == truth).float().mean()))
    assert exact.accuracy_spliced == exact.accuracy
    assert exact.explained_variance == pytest.approx(1.0, abs=1e-6)
    # layer4 is post-ReLU: the 512 relu(-x) features never fire, and no relu(x) feature is dead
    assert exact.dead == list(range(512, 1024))
    zeroed = exact_sae("visual.layer4", 512)
    with torch.no_grad():
        zeroed.W_dec.zero_()
    dropped = evaluate_sae(organism, zeroed, images, **kwargs)
    # measured: 0.985 original accuracy on 200 such scenes; a constant layer4 gives one class for every image
    assert exact.accuracy > 0.9
    assert dropped.accuracy_spliced < 0.5
    assert dropped.explained_variance < 0


def test_evaluation_counts_dead_and_dense_latents(organism, scenes):
    sae = SparseAutoencoder(SITE, 256, 4, activation="relu")
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    result = evaluate_sae(organism, sae, scenes[:8], dense_threshold=0.5)
    assert result.dead == [1, 3] and result.dense == [0, 2] and result.mean_l0 == 2.0
    assert result.to_frame()["dead"].item() == 2 and "SAE evaluation" in result._repr_html_()


# -- arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(n_features=0, k=1), "n_features"),
    (dict(n_features=8), "k"),
    (dict(n_features=8, k=9), "k"),
    (dict(n_features=8, k=2, l1=1.0), "l1"),
    (dict(n_features=8, activation="relu", k=2), "k"),
    (dict(n_features=8, activation="gelu"), "activation"),
    (dict(n_features=8, k=2, tokens="class"), "tokens"),
    (dict(n_features=8, k=2, epochs=0), "epochs"),
    (dict(n_features=8, k=2, batch_size=0), "batch_size"),
    (dict(n_features=8, k=2, lr=-1.0), "lr"),
    (dict(n_features=8, k=2, epochs=2, source=iter([])), "buffer_dir"),
    (dict(n_features=8, k=2, buffer_dir="x", source=iter([])), "fingerprint"),
    (dict(n_features=8, k=2, site="text.transformer"), "site"),
])
def test_bad_arguments_name_the_parameter(organism, scenes, kwargs, parameter):
    kwargs = {"source": scenes[:2], "site": SITE, **kwargs}
    with pytest.raises(InvalidArgumentError) as caught:
        train_sae(organism, kwargs.pop("source"), kwargs.pop("site"), progress=False, **kwargs)
    assert caught.value.parameter == parameter


def test_bad_evaluation_arguments(organism, scenes):
    sae = SparseAutoencoder(SITE, 256, 8, k=2)
    with pytest.raises(InvalidArgumentError, match="classes"):
        evaluate_sae(organism, sae, scenes[:2], labels=["square", "circle"])
    with pytest.raises(InvalidArgumentError, match="labels"):
        evaluate_sae(organism, sae, scenes[:2], labels=["square"], classes=list(SHAPES))
    with pytest.raises(InvalidArgumentError, match="dense_threshold"):
        evaluate_sae(organism, sae, scenes[:2], dense_threshold=2)


# -- selectivity: SAE features against neurons (the known answer) --------------------------------------

VIT_SITE = "visual.transformer.resblocks.3.resid_post"


@pytest.fixture(scope="module")
def vit_scans():
    """d' scans (organism.properties.unit_selectivity) of the ViT organism's last residual stream: its neurons
    and the features of a TopK SAE (512 features, k=16) trained on 400 object scenes for 3 epochs."""
    import clipscope
    from clipscope.organism.properties import unit_selectivity
    model = clipscope.load("organism-vit")
    objects = [s.image for s in generate(400, seed=21, kind="object")]
    sae, _ = train_sae(model, objects, VIT_SITE, n_features=512, k=16, epochs=3, batch_size=256, progress=False)
    features = model.attach(sae)
    scan = dict(n_objects=240, n_words=24)
    return unit_selectivity(model, layers=[VIT_SITE], **scan), unit_selectivity(model, layers=[features], **scan)


def colour_and_shape_margins(scans) -> tuple[list[float], list[float]]:
    """Best feature d' minus best neuron d' for each colour and each shape."""
    neurons, features = scans
    margins = {kind: [features.best[key].dprime - unit.dprime
                      for key, unit in neurons.best.items() if unit.kind == kind] for kind in ("colour", "shape")}
    return margins["colour"], margins["shape"]


@pytest.mark.slow
def test_features_are_more_selective_than_neurons_for_colours(vit_scans):
    colours, _ = colour_and_shape_margins(vit_scans)
    # measured with seed 0 (best neuron d' -> best feature d'): red 1.45 -> 2.04, green 1.79 -> 2.65,
    # blue 1.72 -> 4.09, yellow 2.69 -> 2.92, purple 2.15 -> 2.04, orange 1.83 -> 2.45: mean margin +0.76.
    # Over seeds 0-3 and two sizes (512/k=16, 256/k=8): 4-6 of 6 colours hold, mean margin +0.62 to +1.41;
    # red, green and blue always hold
    assert sum(m >= 0 for m in colours) >= 4
    assert sum(colours) / len(colours) > 0.3


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the issue's claim for every colour and shape does not hold on the ViT "
                   "organism's last residual stream: shapes hold for 2-3 of 6 over seeds 0-3 (seed 0: circle 1.08 -> "
                   "1.04, triangle 1.23 -> 0.84, star 1.48 -> 0.84, hexagon 0.96 -> 0.78 fail; square 0.32 -> 0.53 and "
                   "cross 0.40 -> 0.44 hold) and one colour misses (purple 2.15 -> 2.04); on the ResNet organism's "
                   "visual.layer4, whose channels are planted units, 11 of 12 concepts fail. Why (measured): on the "
                   "ViT shape is barely linear in the pooled stream (the best held-out linear read-out, shrunk LDA, "
                   "reaches d' 0.3-1.5, the best neuron's own level), so a feature can only tie; on the ResNet the "
                   "planted colour units are low-variance axes (0.06-0.15% of the site's variance) that no decoder "
                   "row copies (closest |cos| 0.11-0.20, as for random rows): a reconstruction objective learns "
                   "colour-shape conjunctions instead. Tried: 400-12,000 scenes, 512-4,096 features, k 4-128, "
                   "ReLU + L1, standardized units, pre-ReLU rows, layer3, pooled rows")
def test_most_selective_feature_beats_the_most_selective_neuron_for_every_colour_and_shape(vit_scans):
    colours, shapes = colour_and_shape_margins(vit_scans)
    assert min(colours + shapes) >= 0
