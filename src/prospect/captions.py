"""The caption templates of an inversion: which caption a training sample sees, by its timestep.

A template is a caption with ``{}`` where the concept's token goes (``"{}"``, ``"a photo of {}"``). The
``templates`` of an inversion caption every sample; a *timestep template* (``"LO-HI:TEMPLATE"``) also
captions the samples whose training timestep lies in [LO, HI). A sample draws its caption among those
that apply to its timestep, each as likely. So the words can differ by stage: words that name an attribute
teach the tokens of those timesteps to leave it to the words (docs/inversion-fidelity.md, session 24).
"""

from __future__ import annotations

from .stages import timestep_span


def timestep_template(entry: str, num_train_timesteps: int | None = None) -> tuple[int, int, str]:
    """``"LO-HI:TEMPLATE"`` as (LO, HI, TEMPLATE): TEMPLATE captions the samples of training timestep in [LO, HI)."""
    span, sep, tpl = entry.partition(":")
    try:
        lo, hi = timestep_span(span)
    except ValueError:
        sep = ""
    if not sep:
        raise ValueError(f"timestep template {entry!r} must be LO-HI:TEMPLATE with timesteps LO < HI, "
                         f"e.g. '300-700:a dotted {{}} square'")
    if num_train_timesteps is not None and hi > num_train_timesteps:
        raise ValueError(f"timestep template {entry!r}: HI must be at most the model's {num_train_timesteps} "
                         f"training timesteps")
    check_template(tpl, f"timestep template {entry!r}")
    return lo, hi, tpl


def check_template(tpl: str, label: str) -> None:
    """Refuse a caption template without exactly one ``{}`` (``label`` names it in the message)."""
    try:
        filled = tpl.format("\0")
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(f"{label} is not a caption with one '{{}}' ({err!r})") from None
    if filled.count("\0") != 1:
        raise ValueError(f"{label} must contain '{{}}' exactly once (where the concept token goes)")


def all_templates(cfg) -> list[str]:
    """Every caption template of a run: the ``templates``, then each timestep template's (their index = a caption key)."""
    return list(cfg.templates) + [timestep_template(e)[2] for e in cfg.timestep_templates]


def template_pool(cfg, t: int) -> list[int]:
    """The indices (into ``all_templates``) a sample of timestep ``t`` draws its caption among, each as likely."""
    spans = [timestep_template(e)[:2] for e in cfg.timestep_templates]
    return list(range(len(cfg.templates))) + [len(cfg.templates) + i for i, (lo, hi) in enumerate(spans) if lo <= t < hi]
