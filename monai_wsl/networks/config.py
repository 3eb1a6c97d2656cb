"""Networks that know their own definition: the arguments a network was built with, as a MONAI bundle config
(``{"_target_": ..., **arguments}``), so that the model card records the whole ``network_def`` and evaluation,
inference and export build the same network from it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RecordsConfig", "config_value", "init_parameters"]


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named constructor arguments of ``cls``, with those its ``**kwargs`` passes on to the base classes (the
    first class in the MRO that names an argument gives its default)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        passes_on = False
        for name, parameter in list(inspect.signature(klass.__init__).parameters.items())[1:]:
            if parameter.kind is parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.kind is not parameter.VAR_POSITIONAL:
                found.setdefault(name, parameter)
        if not passes_on:
            break
    return found


def config_value(value: Any, where: str = "") -> Any:
    """``value`` as JSON and MONAI's ``ConfigParser`` take it: a :class:`RecordsConfig` module becomes its config,
    a path a string, a tuple a list. Raises ``TypeError`` for anything else that JSON cannot hold (a module that
    does not record its arguments, a tensor...), naming the argument."""
    if isinstance(value, RecordsConfig):
        return value.get_config()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [config_value(v, f"{where}#{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: config_value(v, f"{where}#{k}") for k, v in value.items()}
    raise TypeError(
        f"argument {where.lstrip('#') or 'value'} is a {type(value).__name__}, which a config cannot record: build "
        "the network from names and numbers (e.g. encoder='efficientnet-lite0', or an encoder class that records "
        "its arguments: monai_wsl.networks.config.RecordsConfig)."
    )


class RecordsConfig:
    """Mixin for ``nn.Module`` classes: an instance keeps the arguments it was constructed with, and
    :meth:`get_config` gives them, defaults included, as a bundle config ``{"_target_": "module.Class", ...}`` that
    ``ConfigParser`` instantiates into the same network (the weights aside).

    The arguments are taken before ``__init__`` runs (in ``__new__``), so a subclass records every argument without
    writing them down again, those its ``**kwargs`` hands to a base class included."""

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = super().__new__(cls)
        # before nn.Module.__init__: a plain attribute (a copy or an unpickled module gets it back from its __dict__)
        object.__setattr__(instance, "_init_args", (args, dict(kwargs)))
        return instance

    def init_arguments(self) -> dict[str, Any]:
        """Every constructor argument by name: those given, and the defaults of the others."""
        args, kwargs = getattr(self, "_init_args", ((), {}))
        parameters = init_parameters(type(self))
        names = list(parameters)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} got {len(args)} positional arguments, it names {len(names)}.")
        given = {**dict(zip(names, args)), **kwargs}
        defaults = {n: p.default for n, p in parameters.items() if p.default is not inspect.Parameter.empty}
        return {**defaults, **given}

    def get_config(self) -> dict[str, Any]:
        """``{"_target_": "module.Class", **every constructor argument}``, JSON-able (see :func:`config_value`)."""
        cls = type(self)
        arguments = {k: config_value(v, k) for k, v in self.init_arguments().items()}
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **arguments}
