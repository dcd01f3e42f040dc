"""Name -> plugin registries for methods, datasets and backbones.

Modelled on timm's ``@register_model``: a plugin registers itself by name in its own file (every
module of the built-in plugin packages is imported on first use), and
third-party packages add more through the entry-point groups ``mmbalance.methods``,
``mmbalance.datasets`` and ``mmbalance.backbones`` (each entry point names a module or an
object; importing it is enough, since the module's decorators do the registering).

A plugin may declare other names it is known by (a class attribute ``aliases``, e.g. the
paper's ``ogm_ge`` for ``ogm``). An alias is only ever suggested ("Did you mean 'ogm'?"), never
silently resolved: the registered name is what a run folder, a record, a leaderboard row and a
grid's status line are keyed by, so one spelling everywhere keeps them greppable and equal.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from mmbalance.errors import MMBalanceError, did_you_mean


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str


class Registry:
    """A named collection of plugins of one kind."""

    def __init__(self, kind: str, builtin_package: str, entry_point_group: str) -> None:
        self.kind = kind
        self._builtin_package = builtin_package
        self._group = entry_point_group
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}  # another name -> the registered one
        self._loaded = False

    def register(self, name: str, description: str = "") -> Callable[[Any], Any]:
        """Decorator: ``@METHODS.register("concat", "late fusion by concatenation")``."""

        def decorate(obj: Any) -> Any:
            key = name.lower()
            old = self._entries.get(key)
            if old is not None and old.obj is not obj and _qualname(old.obj) != _qualname(obj):
                raise MMBalanceError(
                    f"Two {self.kind}s are registered under the name '{key}': "
                    f"{_qualname(old.obj)} and {_qualname(obj)}. Rename one of them."
                )
            options = getattr(obj, "options", None)
            if isinstance(options, dict) and options:  # a conditional search naming a typo fails here
                from mmbalance.config import TRAINER_OPTIONS, check_search_conditions

                check_search_conditions(options, f"{self.kind} '{key}'", TRAINER_OPTIONS)
            doc = (getattr(obj, "__doc__", None) or "").strip()
            self._entries[key] = Entry(key, obj, description or (doc.splitlines()[0] if doc else ""))
            for alias in getattr(obj, "aliases", None) or ():
                self._aliases[str(alias).lower()] = key
            return obj

        return decorate

    def load_plugins(self) -> None:
        """Import the built-in plugin package and every installed entry point, once."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._builtin_package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self._builtin_package}.{info.name}")
        for ep in entry_points(group=self._group):
            try:
                ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the others
                raise MMBalanceError(
                    f"The {self.kind} plugin '{ep.name}' ({ep.value}, entry point group "
                    f"{self._group}) failed to import: {exc}. Fix or uninstall that package."
                ) from exc

    def get(self, name: str) -> Any:
        self.load_plugins()
        key = name.lower()
        if key not in self._entries:
            known = ", ".join(sorted(self._entries))
            aliases = {a: n for a, n in self._aliases.items() if a not in self._entries}
            hint = did_you_mean(key, self._entries, aliases)
            if key in aliases:
                hint += f" ('{key}' is another name of {self.kind} '{aliases[key]}'; pass its registered name.)"
            raise MMBalanceError(
                f"Unknown {self.kind} '{name}'.{hint}",
                choices=f"Known {self.kind}s: {known}. Run 'mmbalance list {self.kind}s' for "
                        f"descriptions, or install a plugin that registers it.",
            )
        return self._entries[key].obj

    def aliases_of(self, name: str) -> list[str]:
        """The other names a registered plugin declared (``aliases``)."""
        self.load_plugins()
        return sorted(a for a, n in self._aliases.items() if n == name.lower() and a not in self._entries)

    def entries(self) -> list[Entry]:
        self.load_plugins()
        return [self._entries[k] for k in sorted(self._entries)]

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS = Registry("method", "mmbalance.methods", "mmbalance.methods")
DATASETS = Registry("dataset", "mmbalance.datasets", "mmbalance.datasets")
BACKBONES = Registry("backbone", "mmbalance.backbones", "mmbalance.backbones")

register_method = METHODS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register
