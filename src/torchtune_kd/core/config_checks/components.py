"""Resolving a section's ``_component_`` and checking its keywords against the component's signature.

Nothing here builds a component: the dotted path is imported and the section's keys are compared with the
keyword arguments the class or function accepts, so a misspelled class or argument is named with a did-you-mean
before any weights load.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Iterable, Optional

from omegaconf import DictConfig

from torchtune_kd.core.config_checks.common import show

# Arguments the recipe passes itself when it builds the component; the config must not set them.
RECIPE_SUPPLIED_ARGS = {"optimizer": ("params",)}


def locate(path: str) -> Any:
    """Import a dotted path (``kd_losses.ForwardKLLoss``) as torchtune's ``config.instantiate`` does.

    Raises:
        torchtune.config._errors.InstantiationError: the module or the name does not exist.
        ValueError: an empty or relative path.
    """
    from torchtune.config._utils import _get_component_from_path

    return _get_component_from_path(path)


def _did_you_mean(path: str, example: str) -> str:
    """Why ``path`` does not import, with the closest public name of its module when that module imports."""
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except Exception:  # importing runs the user's module, which may raise anything: said below
        module = None
    if module is None:
        return f"module {module_name or path!r} cannot be imported: check the spelling, e.g. {example}"
    # A module's __all__ (kd_losses has one) is its menu; otherwise its public names.
    names = list(getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")])
    close = difflib.get_close_matches(name, names, n=1)
    return f"did you mean '{module_name}.{close[0]}'?" if close else f"{module_name!r} has no {name!r}, e.g. {example}"


def resolve_component(key: str, section: Any, problems: list[str], *, example: str) -> Optional[Any]:
    """Import ``section._component_`` without calling it; name an unknown one with a did-you-mean.

    Args:
        key (str): the config key of the section (for the message).
        section (Any): the section's config.
        problems (list[str]): where problems are added.
        example (str): a valid component, shown when the section is not a mapping or has none.

    Returns:
        Optional[Any]: the class or function, or ``None`` (a problem was added).
    """
    if not isinstance(section, DictConfig):
        problems.append(f"{key}={show(section)} must be a mapping with a _component_, e.g. {key}: {{_component_: {example}}}")
        return None
    path = section.get("_component_", None)
    if not isinstance(path, str) or not path:
        problems.append(f"{key}._component_={path!r} is missing: name the class or function to build, e.g. {example}")
        return None
    try:
        return locate(path)
    except Exception:  # torchtune wraps most import failures, but a user's module may raise anything
        problems.append(f"{key}._component_={path!r} cannot be imported: {_did_you_mean(path, example)}")
        return None


def accepted_kwargs(target: Any) -> Optional[list[str]]:
    """Keyword names ``target`` accepts, following ``**kwargs`` up a class hierarchy.

    Returns:
        Optional[list[str]]: sorted names, or ``None`` when the set is open (a function taking ``**kwargs``, or a
        signature that cannot be read), so that nothing is wrongly rejected.
    """
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    functions = (
        [klass.__dict__["__init__"] for klass in target.__mro__ if "__init__" in klass.__dict__ and klass is not object]
        if inspect.isclass(target)
        else [target]
    )
    names: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        names |= {n for n, p in parameters.items() if n != "self" and p.kind in named}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return sorted(names)
    return None


def check_kwargs(key: str, section: DictConfig, target: Any, problems: list[str], *, skip: Iterable[str] = ()) -> bool:
    """Every key of ``section`` is a keyword of ``target``; each stranger is named with a did-you-mean.

    Args:
        key (str): the section's config key.
        section (DictConfig): the section.
        target (Any): the resolved ``_component_``.
        problems (list[str]): where problems are added.
        skip (Iterable[str]): keys already reported another way.

    Returns:
        bool: True when every key is accepted (or the signature is open).
    """
    accepted = accepted_kwargs(target)
    if accepted is None:
        return True
    supplied = RECIPE_SUPPLIED_ARGS.get(key, ())
    accepted = [name for name in accepted if name not in supplied]
    ok = True
    for name in section.keys():
        if name == "_component_" or name in accepted:
            continue
        ok = False  # a skipped key is still wrong: the section must not be built with it
        if name in skip:
            continue
        value = show(section.get(name))
        if name in supplied:
            problems.append(f"{key}.{name}={value} is passed by the recipe itself: remove it")
            continue
        close = difflib.get_close_matches(str(name), accepted, n=1)
        fix = f"did you mean {close[0]!r}?" if close else "remove it"
        problems.append(
            f"{key}.{name}={value} is not an argument of {section._component_}: {fix} (accepted: {', '.join(accepted)})"
        )
    return ok
