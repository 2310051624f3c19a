"""The machinery of safn's Flower patches: a `Patch` is one change to private Flower 1.42 code,
carrying its own targets, the check of each, and its own apply.

Rules, because these are someone else's private internals:

- every target is checked *before* anything is patched: the module imports, the attribute
  exists, and its signature / defaults / source are the ones the patch was written against. A
  mismatch (a Flower upgrade moved or changed it) raises `FlowerPatchError` naming the patch and
  what changed; nothing is half-applied. `tests/test_flower_patches.py` runs the checks, so an
  upgrade fails the suite rather than a run;
- `apply` says in one line, on stderr, which patches it applied;
- `restore` undoes patches in this process (benchmarks compare against stock Flower).

A `Patch` without an apply is a *wording check*: safn reads a line Flower logs (there is no
public API for what it says), and the check verifies that the installed Flower still logs it
with that wording (`log_wording`), when the process that reads it starts.

One module per process applies them, each with one entry point: `serverapp.prepare` (the
coordinator's ServerApp), `supernode.prepare` and `superexec.prepare` (a site), `simulation`
(the simulation driver), `log_wording` (safn-server and safn-client, which read Flower's logs).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

FLOWER_SERIES = "1.42."
"""The Flower release series every target was checked against."""


class FlowerPatchError(RuntimeError):
    """A patch target is missing or not what the patch was written against."""


Check = Callable[[object], "str | None"]


@dataclass(frozen=True)
class Target:
    """One private attribute: ``module.attr`` (``attr`` may be dotted, e.g. a method)."""

    module: str
    attr: str

    def owner_and_name(self):
        obj = importlib.import_module(self.module)
        *path, name = self.attr.split(".")
        for part in path:
            obj = getattr(obj, part)
        return obj, name

    def get(self):
        owner, name = self.owner_and_name()
        return getattr(owner, name)

    def __str__(self) -> str:
        return f"{self.module}.{self.attr}"


@dataclass(frozen=True)
class Patch:
    """One patch: its name, why it exists, its targets each with a check, and how it is
    applied (``install(**settings)``, which changes attributes only through `replace`).
    ``install`` None: a wording check, nothing is changed."""

    name: str
    why: str
    targets: tuple[tuple[Target, Check], ...]
    install: Callable[..., None] | None = field(default=None, compare=False)

    def problems(self) -> list[str]:
        out = []
        for target, check in self.targets:
            try:
                value = target.get()
            except (ImportError, AttributeError) as exc:
                out.append(f"{self.name}: {target} not found ({exc})")
                continue
            problem = check(value)
            if problem:
                out.append(f"{self.name}: {target} {problem}")
        return out


def target(module: str, attr: str, check: Check) -> tuple[Target, Check]:
    return Target(module, attr), check


# -- checks of a target's value -----------------------------------------------------------------

def params(*names: str) -> Check:
    """Expect a callable whose parameters are exactly ``names`` (in order)."""
    def check(value) -> str | None:
        found = tuple(inspect.signature(value).parameters)
        return None if found == names else f"parameters {found}, expected {names}"
    return check


def kwdefaults(*keys: str) -> Check:
    def check(value) -> str | None:
        found = set((value.__kwdefaults__ or {}))
        missing = set(keys) - found
        return None if not missing else f"keyword defaults lack {sorted(missing)}"
    return check


def is_time_module(value) -> str | None:
    return None if value is time or getattr(value, "stands_in_for_time", False) else \
        f"is {value!r}, expected the time module"


def calls(*names: str) -> Check:
    """Expect a function whose code still calls ``names`` (what the patch replaces it for)."""
    def check(value) -> str | None:
        code = getattr(value, "__code__", None)
        if code is None:
            return f"is {value!r}, expected a function"
        missing = [n for n in names if n not in code.co_names]
        return None if not missing else f"no longer calls {missing}"
    return check


def module_sleeps(module: str, expected: set[str]) -> Check:
    """Expect a ``time`` module whose owner ``module`` calls ``time.sleep`` with exactly the
    constant arguments ``expected``."""
    def check(value) -> str | None:
        problem = is_time_module(value)
        if problem:
            return problem
        source = inspect.getsource(importlib.import_module(module))
        found = set(re.findall(r"time\.sleep\(([^)]*)\)", source))
        return None if found == expected else \
            f"sleeps {sorted(found)}, expected {sorted(expected)}"
    return check


def is_int(value) -> str | None:
    return None if isinstance(value, int) else f"is {value!r}, expected an int"


def source_says(*fragments: str) -> Check:
    """Expect a function (or module) whose source still contains every one of ``fragments``:
    the wording of a log call that safn reads (`log_wording`)."""
    def check(value) -> str | None:
        try:
            source = inspect.getsource(getattr(value, "__wrapped__", value))
        except (OSError, TypeError) as exc:
            return f"has no readable source ({exc})"
        missing = [f for f in fragments if f not in source]
        return None if not missing else f"no longer says {missing}"
    return check


# -- checking, applying, restoring --------------------------------------------------------------

_ORIGINALS: dict[str, list[tuple[object, str, object]]] = {}


def flower_version() -> str:
    import flwr

    return flwr.__version__


def check(patches: Iterable[Patch]) -> list[str]:
    """Every problem with the targets of ``patches`` (empty: all present and as expected)."""
    version = flower_version()
    out = [] if version.startswith(FLOWER_SERIES) else [
        f"Flower {version} is installed; these patches were checked on {FLOWER_SERIES}x"]
    for patch in patches:
        out += patch.problems()
    return out


def require(patches: Iterable[Patch], what: str = "patch Flower") -> None:
    """Raise `FlowerPatchError` when any target of ``patches`` is not as expected."""
    problems = check(patches)
    if problems:
        raise FlowerPatchError(f"cannot {what} safely: " + "; ".join(problems))


def replace(patch: Patch, owner, attr: str, value) -> None:
    """Replace ``owner.attr`` for ``patch``, remembering the stock value (for `restore`)."""
    _ORIGINALS.setdefault(patch.name, []).append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, value)


def apply(chosen: Iterable[tuple[Patch, dict]], *, announce: bool = True) -> tuple[str, ...]:
    """Check, then apply each ``(patch, settings)``; already applied ones are left alone.
    Raises `FlowerPatchError` before changing anything when a target is not as expected."""
    todo = [(p, s) for p, s in chosen if p.name not in _ORIGINALS]
    require(p for p, _ in todo)
    for patch, settings in todo:
        patch.install(**settings)
    names = tuple(p.name for p, _ in todo)
    if names and announce:
        print(f"safn: patched Flower {flower_version()} internals: {', '.join(names)}",
              file=sys.stderr, flush=True)
    return names


def restore(names: Iterable[str] | None = None) -> None:
    """Undo patches applied in this process (all of them by default), the last applied first
    (two patches may wrap the same function)."""
    names = None if names is None else set(names)
    for name in reversed([n for n in _ORIGINALS if names is None or n in names]):
        for owner, attr, value in reversed(_ORIGINALS.pop(name, [])):
            setattr(owner, attr, value)


def applied() -> tuple[str, ...]:
    return tuple(_ORIGINALS)


# -- shared by the site's two processes (SuperNode, SuperExec) -----------------------------------

OBJECT_PULL_BACKOFF_S = (0.02, 0.25)
"""First retry of a message object after 20 ms, doubling up to 250 ms (Flower: 1 s up to 10 s)."""


def _install_object_pull_backoff(initial: float = OBJECT_PULL_BACKOFF_S[0],
                                 cap: float = OBJECT_PULL_BACKOFF_S[1]) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = dict(fn.__kwdefaults__)
        defaults.update(initial_backoff=initial, backoff_cap=cap,
                        max_tries_per_object=max(defaults.get("max_tries_per_object") or 0, 5000))
        replace(OBJECT_PULL_BACKOFF, fn, "__kwdefaults__", defaults)


_IU = "flwr.supercore.inflatable.inflatable_utils"

OBJECT_PULL_BACKOFF = Patch(
    "object_pull_backoff",
    "fetching a message's objects backs off 1 s, 2 s, 4 s … up to 10 s while they are in "
    "transit (a site's SuperNode pulling from the SuperLink, its ClientApps from the SuperNode)",
    (target(_IU, "pull_objects",
            kwdefaults("initial_backoff", "backoff_cap", "max_tries_per_object")),
     target(_IU, "pull_and_inflate_object_from_tree",
            kwdefaults("initial_backoff", "backoff_cap", "max_tries_per_object"))),
    _install_object_pull_backoff)
