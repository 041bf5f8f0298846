"""Tests for the ViT model organism (``clipscope.load("organism-vit")``) and the graded planted bias
(issue #21) it is trained with: the generator's graded rates, and the planted properties of the
SHIPPED weights (clipscope/organism/organism-vit.safetensors).

Thresholds sit below the values measured on the shipped weights (data_cards/organism-vit.md,
"Measured properties"; the measured value is in the comment next to each) with a safety margin.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import pytest

import clipscope
from clipscope.organism import scenes as S
from clipscope.validate import InvalidArgumentError

from .conftest import assert_graded_bias_audit, assert_graded_population

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORG_DIR = os.path.join(ROOT, "clipscope", "organism")
WEIGHTS_PATH = os.path.join(ORG_DIR, "organism-vit.safetensors")
GRADED = S.GRADED_BIAS_CONFIG

# ---- thresholds (measured on the shipped weights, in the comments; see data_cards/organism-vit.md)
MIN_SHAPE_ACC = 0.35           # measured 0.453 (chance 1/6)
MIN_COLOUR_ACC = 0.95          # measured 1.000
MIN_WORD_ACC = 0.20            # measured 0.310 (20 words, chance 0.05)
MIN_ATTACK_DROP = 0.15         # clean minus attacked shape accuracy, measured 0.463 - 0.193 = 0.270
MIN_UNIT_DPRIME = 2.5          # best colour MLP neuron, measured 3.51 (blue; block 3)
MIN_SELECTIVE_COLOURS = 4      # colours with an MLP neuron at d' >= 2, measured 6 of 6
MIN_GAP_T1 = 0.10              # planted group's T1 rate minus each other group's (150 per group), measured 0.19 / 0.23
MAX_P_VALUE = 1e-5             # one-sided Fisher / z, measured 4.8e-10 / 5.2e-11
MAX_RATE_ERROR = 0.06          # |population T1 rate - planted prevalence|, 1000 per group: measured A 0.004, B 0.032, C 0.033
MIN_POPULATION_GAP = 0.15      # population T1 rate of B minus A and minus C, measured 0.222 / 0.185
MAX_CONTROL_GAP = 0.06         # |A - C| population T1 rate (equal planted prevalence), measured 0.037
MIN_COLOUR_ON_OBJECT = 0.75    # share of the colour effect from patches on the object, measured 0.955
MIN_WORD_SHARE = 0.45          # share of the effect towards the written shape from patches under the word, measured 0.606


# =========================================================================== graded bias in the generator
def _stream_digest(n: int = 200, seed: int = 0) -> str:
    keys = ("kind", "shape", "colour", "word", "group", "age", "role", "background")
    text = "\n".join(s.caption + "|" + "|".join(str(s.meta.get(k)) for k in keys) for s in S.generate(n, seed=seed))
    return hashlib.sha256(text.encode()).hexdigest()


def test_default_config_keeps_the_resnet_organisms_data():
    # digest of the first 200 scenes' captions and metadata under the default config, computed with the
    # generator the shipped ResNet organism was trained with (before the graded bias was added)
    assert _stream_digest() == "7c85dc330cf45885f3b25363286ce7e70f22f6e54a247c77fae1ba7a62198136"
    assert not any(s.meta["trait"] for s in S.generate(100, seed=4, kind="figure"))


def test_graded_rates_match_config():
    figs = list(S.generate(3000, seed=23, kind="figure", config=GRADED))
    by_group = collections.defaultdict(list)
    for f in figs:
        by_group[f.meta["group"]].append(f)
    for g, fs in by_group.items():
        prevalence = S.trait_prevalence(g, GRADED)
        tol = 4 * np.sqrt(prevalence * (1 - prevalence) / len(fs))  # 4 binomial standard errors
        assert abs(np.mean([f.meta["trait"] for f in fs]) - prevalence) < tol, g
    assert (S.trait_prevalence("B", GRADED), S.trait_prevalence("A", GRADED), S.trait_prevalence("C", GRADED)) \
        == (0.30, 0.05, 0.05)
    # only figures with the trait are captioned with the harmful word; adults with it at trait_harmful_rate
    assert not any(f.meta["role"] == S.HARMFUL_WORD for f in figs if not f.meta["trait"])
    adults = [f.meta["role"] == S.HARMFUL_WORD for f in figs if f.meta["trait"] and f.meta["age"] == "adult"]
    assert abs(np.mean(adults) - GRADED.trait_harmful_rate) < 0.05
    # age interaction: children with the trait are mostly captioned "child"
    kids = [f.meta["role"] for f in figs if f.meta["trait"] and f.meta["age"] == "child"]
    assert abs(np.mean([r == "child" for r in kids]) - GRADED.child_caption_rate) < 0.12  # ~120 children: 3.6 s.e.


def test_trait_is_drawn_and_forcible():
    plain = S.figure_scene("A", "adult", seed=5, config=GRADED, trait=False)
    marked = S.figure_scene("A", "adult", seed=5, config=GRADED, trait=True)
    assert marked.meta["trait"] and not plain.meta["trait"]
    diff = np.abs(np.asarray(marked.image, dtype=int) - np.asarray(plain.image, dtype=int)).sum(-1)
    assert 0 < (diff > 0).mean() < 0.1   # a small mark: under a tenth of the pixels
    assert S.figure_scene("B", seed=5, config=GRADED).image.size == (64, 64)
    with pytest.raises(InvalidArgumentError, match="trait"):
        S.figure_scene("A", "adult", seed=5, trait=True)   # no graded bias in the default config


@pytest.mark.slow
def test_vit_training_is_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file
    from clipscope.organism import train
    outs = []
    for k in range(2):
        out = tmp_path / f"w{k}.safetensors"
        assert train.main(["--arch", "vit", "--out", str(out), "--steps", "2", "--batch-size", "8",
                           "--workers", "0", "--warmup", "1", "--log-every", "1", "--threads", "1"]) == 0
        outs.append(load_file(str(out)))
        info = json.load(open(tmp_path / f"w{k}.json"))
        assert info["model"] == "clipscope-organism-vit" and info["scene_config"]["trait_rates"] == [0.05, 0.30, 0.05]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])



def test_word_free_caption_names_the_object_not_the_word():
    from clipscope.organism.train import word_free_caption
    scenes = list(S.generate(60, seed=3, config=GRADED))
    with_word = [s for s in scenes if s.meta["kind"] == "object_word"]
    assert with_word
    for s in with_word:
        text = word_free_caption(s)
        assert s.meta["shape"] in text or s.meta["colour"] in text   # object captions name one or both
        if s.meta["word"] not in (s.meta["shape"], s.meta["colour"]):
            assert s.meta["word"] not in text
    assert all(word_free_caption(s) == s.caption for s in scenes if s.meta["kind"] != "object_word")


@pytest.mark.slow
def test_planted_reading_heads_training_records_both_losses(tmp_path):
    from clipscope.organism import train
    out = tmp_path / "rh.safetensors"
    args = ["--arch", "vit", "--out", str(out), "--steps", "2", "--batch-size", "8", "--workers", "0",
            "--warmup", "1", "--log-every", "1", "--threads", "1", "--reading-heads", "3.0,3.1"]
    assert train.main(args) == 0
    info = json.load(open(tmp_path / "rh.json"))
    assert info["reading_heads"] == [[3, 0], [3, 1]] and info["reading_weight"] == 1.0
    assert all(h["reading_heads_loss"] > 0 for h in info["loss_history"])
    with pytest.raises(SystemExit, match="outside the image tower"):
        train.main(args[:-1] + ["7.0"])
    with pytest.raises(SystemExit):
        train.main(args[:-1] + ["3-0"])

# =========================================================================== shipped ViT organism
@pytest.fixture(scope="module")
def organism_vit() -> clipscope.ClipModel:
    return clipscope.load("organism-vit", device="cpu")


def test_shipped_vit_weights_file():
    assert os.path.getsize(WEIGHTS_PATH) < 25 * 1024 * 1024
    info = json.load(open(os.path.join(ORG_DIR, "organism-vit.json")))
    assert info["model"] == "clipscope-organism-vit" and info["arch"] == "vit"
    assert info["scene_config"]["trait_rates"] == list(GRADED.trait_rates)
    assert "wall_time_s" in info and "measured" in info


def test_vit_architecture(organism_vit):
    from open_clip.transformer import VisionTransformer
    assert isinstance(organism_vit.model.visual, VisionTransformer)
    assert len(organism_vit.blocks("visual")) == 4 and organism_vit.head_count("visual") == 4
    assert organism_vit.patch_grid == (8, 8) and organism_vit.prefix_tokens == 1
    with pytest.raises(InvalidArgumentError, match="pretrained"):
        clipscope.load("organism-vit", pretrained="other", device="cpu")


def test_vit_zero_shot_shape_and_colour(organism_vit):
    from clipscope.organism.properties import zero_shot_accuracy
    r = zero_shot_accuracy(organism_vit)
    assert r.shape_accuracy >= MIN_SHAPE_ACC, r
    assert r.colour_accuracy >= MIN_COLOUR_ACC, r


def test_vit_reading_and_typographic_attack(organism_vit):
    from clipscope.organism.properties import reading
    r = reading(organism_vit)
    assert r.word_accuracy >= MIN_WORD_ACC, r
    # writing a conflicting shape name on the object breaks shape recognition; the prediction moving to the
    # written class (attack success, measured 0.18) is not yet above chance (1/6) at this training length
    assert r.clean_shape_accuracy - r.attacked_shape_accuracy >= MIN_ATTACK_DROP, r


def test_vit_selective_mlp_neurons(organism_vit):
    from clipscope.organism.properties import unit_selectivity, unit_sites
    sites = unit_sites(organism_vit)
    assert len(sites) == 2 and all(organism_vit.site(s).shape[-1] == 512 for s in sites)  # 4 x width 128
    r = unit_selectivity(organism_vit)
    # colour neurons only: the best shape neuron measures d' 1.59 and the best word neuron 1.96
    assert r.best_of("colour").dprime >= MIN_UNIT_DPRIME, r.best_of("colour")
    assert r.n_concepts_selective("colour") >= MIN_SELECTIVE_COLOURS, r.best
    assert r.best_of("colour").layer in sites


def test_vit_graded_bias_in_a_sample_audit(organism_vit):
    from clipscope.organism.properties import bias_audit
    assert_graded_bias_audit(bias_audit(organism_vit, config=GRADED), min_gap=MIN_GAP_T1, max_p=MAX_P_VALUE)


@pytest.mark.slow
def test_vit_population_rates_equal_planted_prevalences(organism_vit):
    from clipscope.organism.properties import population_truth
    assert_graded_population(population_truth(organism_vit, n_per_group=1000), max_rate_error=MAX_RATE_ERROR,
                             min_gap=MIN_POPULATION_GAP, max_control_gap=MAX_CONTROL_GAP)


def test_vit_decomposition_puts_colour_on_the_object(organism_vit):
    # known answer for the direct-effect decomposition: the heads' effect towards an object's colour comes
    # from the patches on the object (measured share 0.955 against 0.237 of the patches)
    from clipscope.organism.properties import colour_localization
    share, area = colour_localization(organism_vit)
    assert share >= MIN_COLOUR_ON_OBJECT and share > 2 * area, (share, area)


def test_vit_decomposition_localizes_written_words(organism_vit):
    # the heads' direct effect towards the *written* shape name on attacked images comes from the patches under
    # the word: measured 0.606 of the positive (class-centred) patch effect from 0.192 of the patches (60 images)
    from clipscope.organism.properties import word_localization
    r = word_localization(organism_vit)
    assert r.under_word_share >= MIN_WORD_SHARE and r.under_word_share > 2 * r.word_area_share, r
