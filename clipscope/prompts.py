"""Prompt templates and ensembles for zero-shot classification.

A template is a string with one ``{}`` slot for the class name. Zero-shot
classification with several templates averages the normalized text embeddings
of all filled-in templates per class (the prompt ensembling of Radford et al.,
2021, section 3.1.4).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from .validate import InvalidArgumentError

#: The single template used when none is given.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

#: The 80 templates OpenAI used for ImageNet zero-shot evaluation
#: (CLIP repository, ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``).
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: Named template sets accepted wherever ``templates=`` takes a string.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_TEMPLATES,
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
}


def resolve_templates(templates: str | Sequence[str] | None,
                      default: Sequence[str] = DEFAULT_TEMPLATES) -> tuple[str, ...]:
    """Return ``templates`` as a validated tuple of template strings.

    ``None`` gives ``default``; a string names a set in :data:`TEMPLATE_SETS`
    (or, if it contains ``{}``, is a single template). Every template must be a
    string holding exactly one ``{}`` slot and no other format field. Anything else
    raises :class:`~clipscope.validate.InvalidArgumentError` naming ``templates``.
    """
    if templates is None:
        out = tuple(default)
    elif isinstance(templates, str):
        if "{}" not in templates and templates not in TEMPLATE_SETS:
            raise InvalidArgumentError("templates", templates, f"a template set name ({', '.join(TEMPLATE_SETS)}), "
                                                               "a template string containing '{}', or a list of those")
        out = (templates,) if "{}" in templates else TEMPLATE_SETS[templates]
    elif isinstance(templates, Iterable):
        out = tuple(templates)
    else:
        raise InvalidArgumentError("templates", templates, "a template set name, a template string or a list of them")
    if not out:
        raise InvalidArgumentError("templates", templates, "at least one template")
    bad = next((t for t in out if not _is_template(t)), None)
    if bad is not None:
        raise InvalidArgumentError("templates", templates, "strings with exactly one '{}' slot for the class name "
                                                           f"and no other braces; {bad!r} is not one")
    return out


def _is_template(template: object) -> bool:
    """True for a string with exactly one ``{}`` slot that ``str.format`` fills without error."""
    if not isinstance(template, str) or template.count("{}") != 1:
        return False
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return True


def fill(templates: Sequence[str], classname: str) -> list[str]:
    """Return the prompts for one class: each template with ``classname`` filled in."""
    return [t.format(classname) for t in templates]
