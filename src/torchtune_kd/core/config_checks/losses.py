"""The losses and how they are weighted: ``loss``, ``kd_loss``, ``ir_loss``, ``kd_ratio``, ``loss_scaling`` and
``layer_mapping``.

The loss classes are imported, their keywords checked against their signatures and then built (cheap: losses hold
no weights), so that whatever a class rejects is said under its config key. The weighting is read by
``loss_weighting.LossWeighting.from_config`` and the layer mapping by ``alignment.resolve_layer_mapping``, the
code the recipe runs: the pre-flight reports their errors instead of duplicating their rules.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from torchtune_kd.core import alignment, loss_weighting
from torchtune_kd.core.config_checks.common import Findings, as_number, component, show, short
from torchtune_kd.core.config_checks.components import accepted_kwargs, check_kwargs, locate, resolve_component
from torchtune_kd.core.models import HIDDEN_STATES_FLAG

LOSS_SCALING_KEYS = frozenset({"enabled", "method", "manual_scales", "dynamic"})
CHUNKED_CE = "torchtune.modules.loss.CEWithChunkedOutputLoss"
CE_LOSSES = (CHUNKED_CE, "torch.nn.CrossEntropyLoss")
TORCHTUNE_KD_LOSSES = "torchtune.modules.loss."


@dataclass
class LossFindings(Findings):
    """The problems of ``loss``, ``kd_loss`` and ``ir_loss``, and what checking them produced.

    Attributes:
        kd_class (Any): the imported ``kd_loss._component_`` (``None`` when it does not import or is not given).
        kd_loss (Any): the built KD loss (``None`` when a problem kept it from being built).
        ce_loss (Any): the built cross-entropy (``None`` likewise).
    """

    kd_class: Any = None
    kd_loss: Any = None
    ce_loss: Any = None

    @property
    def ignore_index(self) -> int:
        """The CE loss's ``ignore_index`` (torchtune's default -100 when it was not built)."""
        return int(getattr(self.ce_loss, "ignore_index", -100))

    def cache_settings(self) -> Optional[tuple[float, int]]:
        """``(kd_loss temperature, ignore_index)`` a teacher cache must have been made with, or ``None`` when the
        losses were not built (their problems are reported)."""
        if self.kd_loss is None or self.ce_loss is None:
            return None
        return float(getattr(self.kd_loss, "temperature", 1.0)), int(getattr(self.ce_loss, "ignore_index", -100))


@dataclass
class WeightingFindings(Findings):
    """The problems of ``kd_ratio`` and ``loss_scaling``, and the weighting they describe (``None``: invalid)."""

    weighting: Optional[loss_weighting.LossWeighting] = None


@dataclass
class MappingFindings(Findings):
    """The problems of ``layer_mapping`` (and what it needs), and the resolved pairs (empty: no IR loss)."""

    layer_pairs: list[tuple[int, int]] = field(default_factory=list)


# ------------------------------------------------------------------------------------- loss, kd_loss, ir_loss


def _check_loss_numbers(key: str, section: DictConfig, problems: list[str]) -> bool:
    """The numeric loss arguments, checked here so that the message names the config key and a valid value."""
    ok = True
    if "temperature" in section:
        value = section.get("temperature")
        number = as_number(value)
        if number is None or not number > 0:
            problems.append(
                f"{key}.temperature={show(value)} must be a finite number > 0 (both logits are divided by it): "
                f"e.g. {key}.temperature=1.0"
            )
            ok = False
    for name, example in (("lambda_weight", 0.5), ("alpha", 0.1)):
        if name in section:
            value = section.get(name)
            number = as_number(value)
            if number is None or not 0.0 <= number <= 1.0:
                problems.append(f"{key}.{name}={show(value)} must be a number in [0, 1]: e.g. {key}.{name}={example}")
                ok = False
    if "num_output_chunks" in section:
        value = section.get("num_output_chunks")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(
                f"{key}.num_output_chunks={show(value)} must be an integer >= 1: e.g. 8, the same for loss and kd_loss"
            )
            ok = False
    return ok


def _check_ce_keys(loss: DictConfig, problems: list[str], *, skip: Iterable[str] = ()) -> bool:
    """The recipe computes the cross-entropy itself (``loss_step.ce_token_sum``): reject what it would ignore.

    Returns:
        bool: True when every key is one the recipe reads (``skip``: keys reported another way, still not built).
    """
    honoured = ["_component_", "ignore_index"] + (["num_output_chunks"] if component(loss) == CHUNKED_CE else [])
    ok = True
    for name in loss.keys():
        if name in honoured:
            continue
        ok = False
        if name in skip:
            continue
        value = show(loss.get(name))
        if name == "num_output_chunks":
            problems.append(
                f"loss.num_output_chunks={value} is not applied: the model's output is chunked only with {CHUNKED_CE}: "
                "remove it, or use that loss with a chunked kd_loss"
            )
            continue
        close = difflib.get_close_matches(str(name), honoured[1:], n=1)
        fix = f"did you mean {close[0]!r}?" if close else "remove it"
        problems.append(
            f"loss.{name}={value} is not applied: the recipe computes the cross-entropy itself (a mean over the "
            f"tokens whose label is not ignore_index) and reads only {', '.join('loss.' + k for k in honoured)}: {fix}"
        )
    return ok


def _build_loss(key: str, section: DictConfig, target: Any, problems: list[str], *, skip: Iterable[str] = ()) -> Any:
    """Check the section's keywords and numbers, then build it (cheap: losses hold no weights).

    Returns:
        Any: the built loss, or ``None`` (a problem was added).
    """
    from torchtune import config as tt_config

    keywords_ok = check_kwargs(key, section, target, problems, skip=skip)
    if not (_check_loss_numbers(key, section, problems) and keywords_ok):
        return None
    try:
        return tt_config.instantiate(section)
    except Exception as err:  # the user's loss class may reject its arguments in any way: said under its key
        problems.append(f"{key}: could not build {section._component_!r}: {short(err)}: fix the {key} section")
        return None


def _chunk_problems(cfg: DictConfig, ce_name: str, kd_name: str, kd_target: Any, problems: list[str]) -> bool:
    """``loss`` and ``kd_loss`` agree on chunking (and on the number of chunks); True when they disagree on the kind."""
    loss, kd_loss = cfg.loss, cfg.kd_loss
    ce_chunked = ce_name.endswith("CEWithChunkedOutputLoss")
    # Chunked KD losses take the list of logit chunks; the contract says so with a num_output_chunks argument.
    kd_chunked = kd_name.endswith("WithChunkedOutputLoss") or "num_output_chunks" in (accepted_kwargs(kd_target) or [])
    if ce_chunked != kd_chunked:
        problems.append(
            f"loss ({ce_name}) and kd_loss ({kd_name}) must both be chunked or both unchunked: the model produces "
            "one kind of output for both"
        )
        return True
    if ce_chunked:
        ce_chunks = loss.get("num_output_chunks", 8)
        kd_chunks = kd_loss.get("num_output_chunks", 8)
        if ce_chunks != kd_chunks:
            problems.append(
                f"loss.num_output_chunks={ce_chunks} differs from kd_loss.num_output_chunks={kd_chunks}: set both "
                "to the same value"
            )
    return False


def check_losses(cfg: DictConfig) -> LossFindings:
    """``loss``, ``kd_loss`` and ``ir_loss``: supported classes, consistent chunking, then each one built."""
    found = LossFindings()
    problems = found.problems
    loss, kd_loss, ir_loss = cfg.get("loss"), cfg.get("kd_loss"), cfg.get("ir_loss", None)
    ce_name, kd_name = component(loss), component(kd_loss)
    ce_target = kd_target = None
    if ce_name is not None and ce_name not in CE_LOSSES:
        close = difflib.get_close_matches(ce_name, CE_LOSSES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"loss._component_={ce_name!r} is not supported: {hint}use one of {list(CE_LOSSES)}")
    elif loss is not None:
        ce_target = resolve_component("loss", loss, problems, example=CHUNKED_CE)
    if kd_name is not None and kd_name.startswith(TORCHTUNE_KD_LOSSES):
        problems.append(
            f"kd_loss._component_={kd_name!r}: torchtune's KD losses return the soft cross-entropy, not a KL; use the "
            "kd_losses class of the same name (the exact divergence), e.g. kd_losses.ForwardKLWithChunkedOutputLoss"
        )
        found.kd_class = _torchtune_class(kd_name)
    elif kd_loss is not None:
        kd_target = found.kd_class = resolve_component(
            "kd_loss", kd_loss, problems, example="kd_losses.ForwardKLWithChunkedOutputLoss"
        )
        if kd_target is not None and not callable(getattr(kd_target, "token_sum", None)):
            problems.append(
                f"kd_loss._component_={kd_name!r} has no token_sum(student_logits, teacher_logits, labels) -> (sum, "
                "count): the recipe sums every KD loss over tokens itself; use a kd_losses class or add token_sum "
                "(see the README's 'Writing your own divergence')"
            )
            kd_target = None

    chunk_mismatch = ce_target is not None and kd_target is not None and _chunk_problems(
        cfg, ce_name, kd_name, kd_target, problems
    )
    # With a chunked/unchunked mismatch the fix is the class, not removing num_output_chunks: say it once.
    skip = ("num_output_chunks",) if chunk_mismatch else ()
    if ce_target is not None and _check_ce_keys(loss, problems, skip=skip):
        found.ce_loss = _build_loss("loss", loss, ce_target, problems, skip=skip)
    if kd_target is not None:
        found.kd_loss = _build_loss("kd_loss", kd_loss, kd_target, problems, skip=skip)
    if ir_loss is not None:
        ir_target = resolve_component("ir_loss", ir_loss, problems, example="kd_losses.CosineIRLoss")
        if ir_target is not None:
            _build_loss("ir_loss", ir_loss, ir_target, problems)
    return found


def _torchtune_class(path: str) -> Any:
    """One of torchtune's own KD losses, imported only to tell the fused pass and the cache what it is; ``None``
    when the name is misspelled (the kd_loss problem already asks for the kd_losses class instead)."""
    from torchtune.config._errors import InstantiationError

    try:
        return locate(path)
    except (InstantiationError, ValueError):
        return None


# ------------------------------------------------------------------------------------ kd_ratio, loss_scaling


def _check_kd_ratio(cfg: DictConfig, blend: bool, problems: list[str]) -> float:
    """``kd_ratio`` is a number in [0, 1]; returns it, or the default 0.5 when it is absent or wrong.

    Checked whether or not the blend uses it: a wrong value is wrong either way, and ``float('abc')``'s own message
    names neither the key nor the fix.
    """
    value = cfg.get("kd_ratio", None)
    if value is None and not ("kd_ratio" in cfg and blend):
        return 0.5
    number = as_number(value)
    if number is None or not 0.0 <= number <= 1.0:
        problems.append(
            f"kd_ratio={show(value)} must be a number in [0, 1]: the blend is (1 - kd_ratio) * CE + kd_ratio * KD "
            "(used when loss_scaling.enabled is false)"
        )
        return 0.5
    return number


def check_weighting(cfg: DictConfig) -> WeightingFindings:
    """``loss_scaling: {enabled, method, manual_scales, dynamic}`` and ``kd_ratio``, read as the recipe reads them."""
    found = WeightingFindings()
    scaling = cfg.get("loss_scaling", None)
    if scaling is not None and not isinstance(scaling, DictConfig):
        found.problems.append(f"loss_scaling={scaling!r} must be a mapping with keys {sorted(LOSS_SCALING_KEYS)}")
        return found
    for key in (scaling or {}).keys():
        if key not in LOSS_SCALING_KEYS:
            found.problems.append(f"unknown key 'loss_scaling.{key}': the keys are {sorted(LOSS_SCALING_KEYS)}")
    container = OmegaConf.to_container(scaling, resolve=True) if scaling is not None else None
    enabled = bool((container or {}).get("enabled", False))
    kd_ratio = _check_kd_ratio(cfg, not enabled, found.problems)
    try:
        found.weighting = loss_weighting.LossWeighting.from_config(container, kd_ratio)
    except ValueError as err:  # from_config names the key, the value and the fix
        found.problems.append(str(err))
    if enabled and cfg.get("kd_ratio", None) is not None:
        found.notices.append(
            f"kd_ratio={show(cfg.kd_ratio)} is ignored: loss_scaling.enabled=true weights the losses with "
            f"loss_scaling.method={(container or {}).get('method', 'manual')!r}; remove kd_ratio, or set "
            "loss_scaling.enabled=false to blend (1 - kd_ratio) * CE + kd_ratio * KD"
        )
    return found


# ------------------------------------------------------------------------------------------------ layer_mapping


def check_layer_mapping(
    cfg: DictConfig, student_depth: int, teacher_depth: int, weighting: Optional[loss_weighting.LossWeighting]
) -> MappingFindings:
    """``layer_mapping`` resolves against the models' depths, and ``ir_loss``, the hidden-state flags and the IR
    scale agree with it.

    Args:
        cfg (DictConfig): the config (``model`` and ``teacher_model`` are mappings: the models were built).
        student_depth (int), teacher_depth (int): the models' numbers of decoder layers.
        weighting (Optional[LossWeighting]): the loss weighting, ``None`` when ``loss_scaling`` is invalid.
    """
    found = MappingFindings()
    raw_mapping = cfg.get("layer_mapping", None)
    mapping = OmegaConf.to_container(raw_mapping, resolve=True) if isinstance(raw_mapping, ListConfig) else raw_mapping
    try:
        found.layer_pairs = alignment.resolve_layer_mapping(mapping, student_depth, teacher_depth)
    except ValueError as err:  # resolve_layer_mapping names the value and the fix
        found.problems.append(str(err))
        return found
    flags = {key: bool(cfg[key].get(HIDDEN_STATES_FLAG, False)) for key in ("model", "teacher_model")}
    for key in flags:
        raw = cfg[key].get(HIDDEN_STATES_FLAG, False)
        if not isinstance(raw, bool):
            found.problems.append(
                f"{key}.{HIDDEN_STATES_FLAG}={raw!r} must be true or false (the layers come from layer_mapping)"
            )
    if found.layer_pairs:
        if cfg.get("ir_loss", None) is None:
            found.problems.append(
                f"ir_loss is missing (ir_loss=None) but layer_mapping={show(mapping)} needs it: add ir_loss: "
                "{_component_: kd_losses.CosineIRLoss} or set layer_mapping=null"
            )
        unflagged = [key for key, value in flags.items() if not value]
        if unflagged:
            found.notices.append(
                f"layer_mapping is set, so hidden states are captured although {', '.join(unflagged)}."
                f"{HIDDEN_STATES_FLAG} is not true"
            )
        if weighting is not None and weighting.method == "blend":
            found.notices.append(
                "loss_scaling is disabled (kd_ratio blend): the IR loss is computed and logged but NOT optimised and "
                "the projections are not trained; set loss_scaling.enabled=true to train with it"
            )
        return found
    if cfg.get("ir_loss", None) is not None:
        found.notices.append(
            f"ir_loss is set but layer_mapping is empty ({show(raw_mapping)}), so no IR loss is computed: set "
            "layer_mapping (a list of [student, teacher] pairs, or 'auto') to use it, or remove ir_loss"
        )
    flagged = [key for key, value in flags.items() if value]
    if flagged:
        found.problems.append(
            f"{', '.join(f'{k}.{HIDDEN_STATES_FLAG}' for k in flagged)} is true but layer_mapping is empty: set "
            "layer_mapping (a list of [student, teacher] pairs, or 'auto') or remove the flag"
        )
    if weighting is not None and weighting.method != "blend" and weighting.scales["ir"] > 0:
        found.problems.append(
            f"loss_scaling.manual_scales.ir={weighting.scales['ir']} but layer_mapping is empty, so there is no IR "
            "loss: set layer_mapping or loss_scaling.manual_scales.ir=0"
        )
    return found
