"""``render``'s speed options (``channels_last``, ``autocast``): they take effect, they keep the optimization
working on the tiny ResNet and the organism, channels-last changes nothing beyond float rounding, bf16
stays close to fp32 in result, and bad values are refused naming the parameter."""
from __future__ import annotations

import pytest
import torch

from clipscope import Unit
from clipscope import optvis as ov
from clipscope.optvis.objectives import Objective
from clipscope.optvis.render import optimization_site
from clipscope.validate import InvalidArgumentError
from tests.test_optvis import assert_rises

OPTIONS = [{"channels_last": True}, {"autocast": "bf16"}, {"channels_last": True, "autocast": "bf16"}]
STEPS = 40
# The unit asked for per model; render optimizes it at its pre-activation site.
SITES = {"clipscope-tiny-rn": "visual.layer4.0.act3.pre", "organism": "visual.layer4"}
#: The unit rendered: channel 3 of the tiny ResNet; on the organism its most selective colour unit (orange,
#: d' 5.8 on the graded-bias weights): its channel 3 responds weakly there, and bf16/fp32 gain ratios of such a
#: unit scatter from 0.04 to 1.5 between images.
CHANNELS = {"clipscope-tiny-rn": 3, "organism": 222}
# bf16's final-image gain over the starting images as a fraction of fp32's, mean over the batch, measured with
# these renders (40 steps, batch 2): tiny ResNet 0.985-1.018 (seeds 0, 1); organism 0.95-1.05 (seeds 0-2;
# 0.81-1.17 per image).
BF16_GAIN_FLOOR = 0.85

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["clipscope-tiny-rn", "organism"])
def model(request):
    if request.param == "organism":
        return request.getfixturevalue("organism")
    return request.getfixturevalue("tiny_rn")


def render(model, **kw) -> ov.RenderResult:
    kw = {"batch": 2, "steps": STEPS, "progress": False, **kw}
    return ov.render(model, Unit.channel(SITES[model.name], CHANNELS[model.name]), **kw)


def final_gain(model, result: ov.RenderResult, start: ov.RenderResult) -> torch.Tensor:
    """Per image: the unit's fp32 value on ``result``'s final images (untransformed) minus on ``start``'s."""
    site = optimization_site(model, SITES[model.name])

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            acts = model.activations(ov.ClipInput(model)(images.to(model.device)), site)
        return model.read(Unit.channel(site, CHANNELS[model.name]), acts).float().cpu()

    return score(result.images) - score(start.images)


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_objective_rises_with_each_option(model, options):
    result = render(model, **options)
    baseline = render(model, lr=0.0, **options)  # the same seed's starting images through the same transforms
    assert_rises(result.trace, baseline.trace)
    assert result.images.dtype == torch.float32 and result.trace.dtype == torch.float32


@pytest.mark.parametrize("options, dtype, channels_last", [
    ({}, torch.float32, False),
    ({"channels_last": True}, torch.float32, True),
    ({"autocast": "bf16"}, torch.bfloat16, False),
])
def test_options_change_how_the_forward_pass_runs(tiny_rn, options, dtype, channels_last):
    seen = []
    base = ov.channel(SITES[tiny_rn.name], 3)

    def spy(ctx):
        act = ctx.acts[SITES[tiny_rn.name]]
        seen.append((act.dtype, act.is_contiguous(memory_format=torch.channels_last) and not act.is_contiguous()))
        return base(ctx)

    ov.render(tiny_rn, Objective(spy, "spy", units=base.units), steps=1, progress=False, **options)
    assert seen == [(dtype, channels_last)]


def test_channels_last_gives_the_default_result_to_float_rounding(tiny_rn):
    default, fast = render(tiny_rn, steps=16), render(tiny_rn, steps=16, channels_last=True)
    torch.testing.assert_close(fast.images, default.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.trace, default.trace, atol=1e-6, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_final_images_score_close_to_fp32(model, seed):
    start = render(model, lr=0.0, steps=1, seed=seed)
    fp32 = final_gain(model, render(model, seed=seed), start)
    bf16 = final_gain(model, render(model, seed=seed, autocast="bf16"), start)
    assert bool((fp32 > 0).all()), f"fp32 render did not raise the unit: {fp32.tolist()}"
    assert float(bf16.mean()) >= BF16_GAIN_FLOOR * float(fp32.mean()), \
        f"bf16 gain {bf16.tolist()} vs fp32 gain {fp32.tolist()}"


@pytest.mark.parametrize("parameter, value", [
    ("channels_last", "yes"), ("channels_last", 1), ("channels_last", None),
    ("autocast", "fp16"), ("autocast", "bfloat16"), ("autocast", True), ("autocast", torch.bfloat16),
])
def test_invalid_option_values_are_refused_naming_the_parameter(tiny_rn, parameter, value):
    with pytest.raises(InvalidArgumentError) as err:
        ov.render(tiny_rn, Unit.channel(SITES[tiny_rn.name], 3), steps=1, progress=False, **{parameter: value})
    assert parameter in str(err.value) and repr(value) in str(err.value)
