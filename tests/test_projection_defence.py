"""The learned projection defence (Materzyńska, Torralba & Bau, CVPR 2022): known answers.

1. A synthetic embedding space with a planted "visual" subspace (class concepts) and a planted
   "written" subspace (spelling): the fitted projection keeps the first and drops the second.
2. On the ResNet organism (which reads rendered words: untargeted attack success ~0.55), a projection
   fitted only with words that are *not* class names lowers the success of attacks that write class
   names, at nearly the same clean accuracy.
3. Mechanics: inside the defence's context both towers' embeddings are projected (the class cache
   filled before cannot leak unprojected prompts in, nor projected ones out); save/load round trip;
   exact orthogonality; seeded; bad input.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from clipscope.organism import COLOURS, SHAPES
from clipscope.organism.scenes import OBJECT_WORDS, object_scene
from clipscope.typographic import Attack, TextStyle, clean_scores, evaluate
from clipscope.typographic.projection import ProjectionDefence, orthonormal_rows, principal_cosines
from clipscope.validate import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

#: Seed blocks of object scenes used nowhere else (training of the organism: 0; its card: 1,000,003+;
#: test_typographic_organism: 4,000,000+).
FIT_SEED, TEST_SEED = 7_000_000, 7_500_000
#: The attack of test_typographic_organism (black on a white box, a quarter of the image high).
STYLE = TextStyle(size=0.25, colour="black", box="white", padding=0.1)


def scenes(n: int, seed: int):
    out = [object_scene(shape=SHAPES[i % len(SHAPES)], seed=seed + i) for i in range(n)]
    return [s.image for s in out], [s.meta["shape"] for s in out]


# ------------------------------------------------------------------------------------- 1. planted subspaces
def planted_world(seed: int, d: int = 32, n: int = 240, n_classes: int = 6, n_spell: int = 4, n_words: int = 6):
    """Embeddings with a planted answer. Orthonormal directions split the space into V (one direction per
    class: what images show), T (spelling: where a written word moves an image) and the rest (noise).

    A clean image is its class direction plus a little within-V variation (shared with its attacked copy)
    and independent noise; an attacked copy adds a written word's spelling vector, 1.5 times as long. A
    class prompt is its concept *plus* the spelling of its name: the entanglement that makes attacks work.
    Training words are not class names; the held-out attack writes a wrong class name.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T
    visual, spelling, rest = q[:n_classes], q[n_classes:n_classes + n_spell], q[n_classes + n_spell:]
    spell = F.normalize(torch.randn(n_classes + n_words, n_spell, generator=g), dim=-1) @ spelling
    labels = torch.arange(n) % n_classes

    def noise():
        return 0.5 * torch.randn(n, len(rest), generator=g) @ rest / len(rest) ** 0.5

    shown = visual[labels] + 0.3 * torch.randn(n, n_classes, generator=g) @ visual / n_classes ** 0.5
    trained_words = torch.randint(n_classes, n_classes + n_words, (n,), generator=g)
    wrong_class = (labels + torch.randint(1, n_classes, (n,), generator=g)) % n_classes
    return types.SimpleNamespace(
        visual=visual, spelling=spelling, labels=labels, wrong_class=wrong_class,
        clean=F.normalize(shown + noise(), dim=-1),
        attacked=F.normalize(shown + 1.5 * spell[trained_words] + noise(), dim=-1),
        held_out_attack=F.normalize(shown + 1.5 * spell[wrong_class] + noise(), dim=-1),
        class_text=F.normalize(visual + spell[:n_classes], dim=-1),
        word_text=F.normalize(spell[n_classes:] + 0.5 * torch.randn(n_words, len(rest), generator=g) @ rest, dim=-1))


def predictions(embeddings, class_text, basis=None):
    if basis is not None:
        embeddings, class_text = embeddings @ basis.T, class_text @ basis.T
    return (F.normalize(embeddings, dim=-1) @ F.normalize(class_text, dim=-1).T).argmax(dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fitted_projection_keeps_the_planted_visual_subspace_and_drops_the_written_one(seed):
    w = planted_world(seed)
    assert (predictions(w.held_out_attack, w.class_text) == w.wrong_class).float().mean() > 0.4  # the attack works
    fitted = ProjectionDefence.fit_embeddings(w.clean, w.attacked, w.class_text, w.labels, negatives=w.word_text,
                                              dim=8, seed=seed, progress=False)
    keeps, drops = principal_cosines(w.visual, fitted.basis), principal_cosines(w.spelling, fitted.basis)
    # Measured 2026-12-01 (seeds 0-4, dim 8, 200 steps): the smallest principal cosine with V 0.92-0.98, the
    # largest with T 0.07-0.25; a random 8-d subspace of the 32 dims gives 0.03-0.19 and 0.59-0.81.
    assert keeps.min() >= 0.85, keeps
    assert drops.max() <= 0.40, drops
    # the attack that writes class names (never seen in training) no longer works; clean accuracy stays
    # (measured 0.00 and 1.00)
    assert (predictions(w.held_out_attack, w.class_text, fitted.basis) == w.wrong_class).float().mean() <= 0.05
    assert (predictions(w.clean, w.class_text, fitted.basis) == w.labels).float().mean() >= 0.95


# ------------------------------------------------------------------------------------- 2. the organism
@pytest.mark.slow
def test_on_the_organism_a_projection_fitted_on_other_words_defeats_attacks_writing_class_names(organism):
    images, labels = scenes(240, FIT_SEED)
    held_out = list(COLOURS) + list(OBJECT_WORDS)  # no shape name is written during fitting
    defence = ProjectionDefence.fit(organism, images, labels, SHAPES, words=held_out, dim=8, progress=False)
    test_images, test_labels = scenes(180, TEST_SEED)
    attack = Attack.untargeted(STYLE, "center")
    plain = evaluate(organism, test_images, test_labels, SHAPES, attack, progress=False).metrics
    defended = evaluate(organism, test_images, test_labels, SHAPES, attack, defence=defence, progress=False).metrics
    # Measured 2026-12-01 on the ResNet organism (these blocks, fitting seeds 0-2): success 0.54 -> 0.10-0.12,
    # clean accuracy 0.994 -> 0.96-0.98, attacked accuracy 0.17 -> 0.51-0.60 (other blocks and dims 6-12:
    # success 0.09-0.17, clean accuracy 0.92-0.96). Margins: success at most 0.30 and half the undefended
    # rate; clean accuracy within 0.10; attacked accuracy up by at least 0.15.
    assert plain["attack_success_rate"] >= 0.40, plain
    assert defended["attack_success_rate"] <= min(0.30, plain["attack_success_rate"] / 2), defended
    assert defended["clean_accuracy"] >= plain["clean_accuracy"] - 0.10, defended
    assert defended["attacked_accuracy"] >= plain["attacked_accuracy"] + 0.15, defended


# ------------------------------------------------------------------------------------- 3. mechanics
def random_defence(k: int = 16, d: int = 128, seed: int = 0) -> ProjectionDefence:
    return ProjectionDefence(orthonormal_rows(torch.randn(k, d, generator=torch.Generator().manual_seed(seed))))


def test_both_towers_are_projected_inside_the_context_and_nothing_leaks_out(organism):
    images, _ = scenes(8, TEST_SEED)
    defence = random_defence()
    prompts = [f"a photo of a {c}." for c in SHAPES]
    cached = organism.class_embeddings(SHAPES)  # fills the class cache with unprojected prompts
    raw_images = organism.encode_image(images, normalize=False)
    raw_text = organism.encode_text(prompts, normalize=False)
    model_id, module_attrs = organism.id, set(vars(organism.model))
    with defence.context(organism):
        assert organism.id != model_id
        assert torch.allclose(organism.encode_image(images, normalize=False), defence.project(raw_images), atol=1e-5)
        assert torch.allclose(organism.encode_text(prompts, normalize=False), defence.project(raw_text), atol=1e-5)
        assert torch.allclose(organism.class_embeddings(SHAPES), F.normalize(defence.project(raw_text), dim=-1),
                              atol=1e-5)
    # the typographic harness scores cosines of projected images and projected prompts (an independent
    # computation from the unprojected embeddings)
    scored = clean_scores(organism, images, SHAPES, defence=defence, progress=False)
    cos = F.normalize(defence.project(raw_images), dim=-1) @ F.normalize(defence.project(raw_text), dim=-1).T
    assert torch.allclose(scored.probs, (organism.logit_scale * cos).softmax(dim=-1), atol=1e-4)
    assert not torch.allclose(scored.probs, clean_scores(organism, images, SHAPES, progress=False).probs, atol=1e-2)
    # and everything is as before afterwards, also after an error inside the block
    with pytest.raises(RuntimeError), defence.context(organism):
        raise RuntimeError("boom")
    assert organism.id == model_id and set(vars(organism.model)) == module_attrs
    assert torch.equal(organism.class_embeddings(SHAPES), cached)
    assert torch.allclose(organism.encode_image(images, normalize=False), raw_images, atol=1e-6)


def test_fit_is_seeded_exactly_orthogonal_and_survives_a_save_load_round_trip(organism, tmp_path):
    images, labels = scenes(24, FIT_SEED)
    fit = lambda seed: ProjectionDefence.fit(organism, images, labels, SHAPES, dim=12, steps=15, seed=seed,
                                             progress=False)
    defence, again, other = fit(0), fit(0), fit(1)
    assert torch.equal(defence.basis, again.basis) and not torch.allclose(defence.basis, other.basis)
    assert defence.basis.shape == (12, organism.embed_dim)
    assert (defence.basis.double() @ defence.basis.double().T - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-5
    assert len(defence.history) == 15 and defence.info["n_images"] == 24 and defence.info["words"] == list(SHAPES)

    path = defence.save(tmp_path / "projection.safetensors")
    loaded = ProjectionDefence.load(path, organism)
    assert torch.equal(loaded.basis, defence.basis) and loaded.info == defence.info
    assert loaded.history == defence.history and loaded.describe() == defence.describe()
    before = clean_scores(organism, images, SHAPES, defence=defence, progress=False)
    after = clean_scores(organism, images, SHAPES, defence=loaded, progress=False)
    assert torch.equal(before.probs, after.probs) and before.predictions == after.predictions


def test_bad_input_gets_one_clear_error(organism, tmp_path):
    images, labels = scenes(6, FIT_SEED)
    with pytest.raises(InvalidArgumentError, match="basis"):
        ProjectionDefence(torch.randn(4, 16))  # rows not orthonormal
    with pytest.raises(InvalidArgumentError, match="basis"):
        ProjectionDefence(torch.eye(8))  # keeps everything: not a projection onto a subspace
    for kwargs, parameter in [({"labels": labels[:-1] + ["blob"]}, "labels"), ({"labels": labels[:3]}, "images"),
                              ({"dim": organism.embed_dim}, "dim"), ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
                              ({"words": "circle"}, "words"), ({"classes": ["circle"]}, "classes")]:
        args = {"images": images, "labels": labels, "classes": SHAPES, **kwargs}
        with pytest.raises(InvalidArgumentError, match=parameter):
            ProjectionDefence.fit(organism, args.pop("images"), args.pop("labels"), args.pop("classes"), **args,
                                  progress=False)
    with pytest.raises(InvalidArgumentError, match="model"):  # a black-box model has no embeddings to project
        ProjectionDefence.fit(types.SimpleNamespace(embed_dim=128), images, labels, SHAPES)
    with pytest.raises(InvalidArgumentError, match="model"), random_defence(d=64).context(organism):
        pass

    with pytest.raises(InvalidArgumentError, match="path"):
        ProjectionDefence.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgumentError, match="path"):
        ProjectionDefence.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"basis": torch.eye(4, 8)}, tmp_path / "other.safetensors", metadata={"format": "something-else"})
    with pytest.raises(InvalidArgumentError, match="path"):
        ProjectionDefence.load(tmp_path / "other.safetensors")
    small = random_defence(d=64).save(tmp_path / "small.safetensors")
    assert ProjectionDefence.load(small).embed_dim == 64
    with pytest.raises(InvalidArgumentError, match="model"):
        ProjectionDefence.load(small, organism)
