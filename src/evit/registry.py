"""Token-reduction methods by name: one line makes a method known to the patch, the tools and the CLI.

A method class declares what the rest of evit needs to know of it (class attributes of
:class:`evit.reduction.TokenReduction`: ``name``, ``label``, ``setting``, ``compare_grid``,
``bench_grid``, ``learned``, ``needs_class_token``, ``needs_images``, ...). Registering it is
one line, the decorator::

    @evit.register
    class Halve(KeepRateReduction):
        name = "halve"
        ...

after which ``evit.patch(model, method="halve")``, ``evit bench --method halve`` and
``evit compare --methods halve`` know it, with no other edit. A package of methods outside evit
makes them known to the ``evit`` command through the entry-point group ``evit.methods``
(``[project.entry-points."evit.methods"] halve = "mypackage.halve"``): each entry point names a
module whose import registers its methods, or a method class; they load the first time a
method is looked up by name.
"""
from __future__ import annotations

from typing import Union

from .reduction import TokenReduction

#: registered methods by name, in the order they were registered (evit's own first)
METHODS: dict[str, type] = {}

SETTINGS = ("keep_rate", "r")
ENTRY_POINT_GROUP = "evit.methods"
_plugins_loaded = False


def register(cls: type) -> type:
    """Make ``cls`` (a :class:`TokenReduction` subclass with a ``name``) known by its name; returns it,
    so it serves as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, TokenReduction)):
        raise TypeError(f"register expects a TokenReduction subclass, got {cls!r}")
    name = cls.__dict__.get("name", "")
    if not name or not isinstance(name, str) or name != name.lower():
        raise ValueError(f"{cls.__name__} needs its own lower-case `name` class attribute to be registered")
    if cls.setting not in SETTINGS:
        raise ValueError(f"{cls.__name__}.setting must be one of {SETTINGS}, got {cls.setting!r}")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
    cls.label = cls.__dict__.get("label") or cls.__name__
    METHODS[name] = cls
    return cls


def check_settings_apply(methods, given: dict[str, str]) -> None:
    """Refuse settings that no method of ``methods`` takes: ``given`` maps a setting kind (``keep_rate``, ``r``)
    to the option that gave it (``--keep-rates``); an option none of the methods reads would be ignored."""
    kinds = {method_class(m).setting for m in methods}
    for kind, option in given.items():
        if option and kind not in kinds:
            takes = sorted(n for n, c in METHODS.items() if c.setting == kind and getattr(c, "listed", True))
            what = {"keep_rate": "a keep rate", "r": "r (tokens merged per block)"}[kind]
            raise ValueError(f"{option} sets {what}, which {', '.join(methods)} "
                             f"{'does' if len(methods) == 1 else 'do'} not take (methods that do: {', '.join(takes)}); "
                             "leave it out")


def unregister(name: str) -> None:
    """Forget method ``name`` (tests, notebooks re-defining a method)."""
    METHODS.pop(name, None)


def _load_plugins() -> None:
    """Import the methods other packages declare under the entry-point group ``evit.methods``, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin names itself, never breaks evit
            raise RuntimeError(f"the evit method plugin {entry.name!r} ({entry.value}) failed to load: {e}") from e
        if isinstance(loaded, type) and loaded.__dict__.get("name") not in METHODS:
            register(loaded)


def names(listed_only: bool = True) -> list[str]:
    """Registered method names, evit's own first; ``listed_only``: those the command line offers."""
    _load_plugins()
    return [n for n, cls in METHODS.items() if cls.listed or not listed_only]


def method_class(method: Union[str, type]) -> type:
    """The method class for a name or a class (a class passes through, registered or not)."""
    if isinstance(method, str):
        _load_plugins()
        if method.lower() not in METHODS:
            raise ValueError(f"unknown token-reduction method {method!r}; choose one of {sorted(names())}")
        return METHODS[method.lower()]
    if not (isinstance(method, type) and issubclass(method, TokenReduction)):
        raise TypeError(f"method must be a TokenReduction class or one of {sorted(names())}, got {method!r}")
    return method
