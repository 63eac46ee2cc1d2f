"""Typed settings: dataclasses built from user mappings, with errors that name the fix.

Every configuration in actedit (a method's hyperparameters, training options, a study's YAML
blocks) is a small dataclass deriving from :class:`Settings`. :meth:`Settings.from_mapping`
builds one from a mapping (a YAML block, ``--set`` overrides, Python keyword arguments) and
refuses unknown keys with an :class:`UnknownSettingError` that lists the valid keys and the
closest match; values are validated by each dataclass's ``__post_init__``. Python functions whose
keyword arguments are settings take :func:`keyword_checked`, so that a mistyped keyword gets the
same message.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Type, TypeVar, cast

S = TypeVar("S", bound="Settings")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownSettingError(ValueError, TypeError):
    """A mistyped or unsupported setting name.

    A ``ValueError`` (what the CLI reports as one line) and a ``TypeError`` (what Python raises for
    an unexpected keyword argument), so either ``except`` catches it.
    """


def _suggest(unknown: Sequence[str], valid: Sequence[str], prefix: str = "") -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        parts.append(f"{prefix}{key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(parts)


def unknown_keys_message(unknown: Sequence[str], valid: Iterable[str], where: str) -> str:
    """``"unknown key(s) WHERE.KEY (did you mean ...?); valid keys of WHERE: ..."``."""
    valid = sorted(valid)
    return (
        f"unknown key{'s' if len(unknown) > 1 else ''} {_suggest(unknown, valid, where + '.' if where else '')}; "
        f"valid keys{' of ' + where if where else ''}: {', '.join(valid) if valid else 'none'}."
    )


def check_keys(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Raise :class:`UnknownSettingError` when ``given`` holds a key outside ``valid``."""
    valid = set(valid)
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise UnknownSettingError(unknown_keys_message(unknown, valid, where))


def check_moved(given: Iterable[str], moved: Mapping[str, str], where: str) -> None:
    """Raise :class:`UnknownSettingError` for keys of ``given`` an earlier release accepted and that
    now live elsewhere (``moved``: key → its new place), saying where each went."""
    keys = [k for k in given if k in moved]
    if keys:
        prefix = f"{where}." if where else ""
        raise UnknownSettingError("; ".join(f"{prefix}{k} has moved: set {moved[k]} instead" for k in keys) + ".")


@dataclasses.dataclass
class Settings:
    """Base of actedit's typed settings (see the module docstring).

    ``MOVED`` maps keys an earlier release accepted to where they live now; such a key gets an
    error saying so instead of "unknown key".
    """

    MOVED: ClassVar[Dict[str, str]] = {}

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_mapping(cls: Type[S], values: Optional[Mapping[str, Any]] = None, where: str = "", **extra: Any) -> S:
        """An instance from ``values`` (None: the defaults) and ``extra``; ``where`` names the
        block in error messages (``methods.hpr.settings``)."""
        if values is None:
            values = {}
        if isinstance(values, cls):
            values = dataclasses.asdict(values)
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{where or cls.__name__} must be a mapping of settings, got {type(values).__name__} ({values!r:.60})."
            )
        merged = {**values, **extra}
        check_moved(merged, cls.MOVED, where)
        check_keys(merged, cls.field_names(), where or cls.__name__)
        try:
            return cls(**merged)
        except UnknownSettingError:
            raise
        except ValueError as exc:
            raise ValueError(cls._key_path_message(merged, where, str(exc))) from exc

    @classmethod
    def _key_path_message(cls, merged: Mapping[str, Any], where: str, message: str) -> str:
        """``message`` led by the key path of the value it is about (``methods.iti.settings.alpha:
        ...``): the given key whose removal (its default restored) makes the settings valid."""
        defaulted = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        for key in merged:
            if key not in defaulted:
                continue
            try:
                cls(**{k: v for k, v in merged.items() if k != key})
            except (ValueError, TypeError):
                continue
            path = f"{where}.{key}" if where else key
            return message if path in message else f"{path}: {message}"
        return message if not where or where in message else f"{where}: {message}"

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain JSON-friendly values (recorded in artifacts and reports)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def keyword_checked(fn: F) -> F:
    """Make ``fn`` refuse unknown keyword arguments with :class:`UnknownSettingError` (valid names
    and the closest match listed) instead of Python's bare ``TypeError``. Functions that take
    ``**kwargs`` themselves are left as they are."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    valid = [
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise UnknownSettingError(
                f"{fn.__name__}() got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
                f"{_suggest(unknown, valid)}; valid: {', '.join(valid)}."
            )
        return fn(*args, **kwargs)

    return cast(F, wrapper)
