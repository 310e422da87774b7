"""gin CLI handling (t5x style): several --gin_file, --gin.KEY=value overrides, clear errors before
any compilation for unknown or misspelled bindings (listing the valid parameters)."""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import pkgutil
import re
import types
import typing

import gin

import models
import train.loop  # noqa: F401  (registers train.train / DataConfig / OptimizerConfig / UnigramTargets)

for _m in pkgutil.iter_modules(models.__path__):  # every model module registers its classes when imported
    importlib.import_module(f"models.{_m.name}")


class ConfigError(ValueError):
    pass


def split_gin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``--gin.KEY=value`` out of argv; returns (bindings, remaining argv)."""
    bindings, rest = [], []
    for a in argv:
        if a.startswith("--gin.") and "=" in a:
            bindings.append(a[len("--gin."):])
        else:
            rest.append(a)
    return bindings, rest


HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")


def run_app(main, argv: list[str], define_flags=None) -> None:
    """absl ``app.run(main)`` after ``define_flags()`` (the CLI's flags) and moving the ``--gin.KEY=value`` flags
    of argv into GIN_CLI_BINDINGS; a help flag prints the usage and exits 0 (absl's own exit status for it is 1)."""
    from absl import app

    if define_flags is not None:
        define_flags()
    GIN_CLI_BINDINGS[:], rest = split_gin_args(argv)
    try:
        app.run(main, argv=rest)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in rest[1:]):
            raise SystemExit(0) from None
        raise


GIN_CLI_BINDINGS: list[str] = []  # the --gin.KEY=value bindings of the running CLI


def _valid_params(name: str) -> list[str]:
    try:
        fn = gin.config._REGISTRY.get_match(name).wrapped  # noqa: SLF001 - gin has no public lookup
    except Exception:  # noqa: BLE001
        return []
    target = fn.__init__ if inspect.isclass(fn) else fn
    return [p for p in inspect.signature(target).parameters if p != "self"]


def parse(gin_files: list[str], bindings: list[str]) -> None:
    """Parse and lock the config; raise ConfigError naming the bad parameter, the file and the valid ones."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=False)
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
        msg = str(e)
        m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
        if m:
            valid = _valid_params(m.group(1))
            raise ConfigError(f"{msg}\nvalid parameters of {m.group(1)}: {', '.join(valid)}") from None
        m = re.search(r"No configurable matching '([^']+)'", msg)
        if m:
            known = sorted(k for k, _ in gin.config._REGISTRY.items())  # noqa: SLF001
            raise ConfigError(f"{msg}\nknown configurables: {', '.join(known)}") from None
        raise ConfigError(msg) from None
    gin.finalize()
    validate(gin_files, bindings)


# ------------------------------------------------------------------------------------------------
# Type and presence checks of the bound values (before anything is built or compiled)
# ------------------------------------------------------------------------------------------------

ENTRY_POINT = "train.train"


def _type_ok(v, t) -> bool:
    """Does ``v`` fit annotation ``t``? Unknown annotations (callables, classes, ...) accept anything;
    gin lists are accepted for tuples / sequences; ints for floats."""
    if isinstance(v, gin.config.ConfigurableReference):
        return True  # @configurable references are checked when they are built
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is typing.Any or t is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    if t in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(v, (tuple, list)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(v) == len(args) and all(_type_ok(x, a) for x, a in zip(v, args))
        return all(_type_ok(x, args[0]) for x in v)
    if t is dict or origin is dict:
        return isinstance(v, dict)
    return True


def _tname(t) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "").replace("collections.abc.", "")


def _hints(selector: str) -> dict:
    try:
        fn = gin.config._REGISTRY.get_match(selector).wrapped  # noqa: SLF001
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) and not hasattr(fn, "__dataclass_fields__")
                                     else fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check
        return {}


def _macro_name(v) -> str | None:
    if isinstance(v, gin.config.ConfigurableReference) and v.selector == "gin.macro":
        return v.scoped_selector.split("/")[-2]
    return None


def _where(gin_files: list[str], bindings: list[str], scope: str, selector: str, param: str,
           macro: str | None) -> str:
    """Where a binding was written: the last command-line binding or gin-file line that sets it."""
    short = selector.split(".")[-1]
    key = re.escape(macro) if macro else rf"(?:[\w./]*/)?(?:[\w.]*\.)?{re.escape(short)}\.{re.escape(param)}"
    pat = re.compile(rf"^\s*{key}\s*=")
    prefer = (lambda line: f"{scope}/" in line) if scope and not macro else (lambda line: True)  # noqa: E731
    for want in (prefer, lambda line: True):
        for b in reversed(bindings):
            if pat.match(b) and want(b):
                return f"command-line binding --gin.{b}"
        for f in reversed(gin_files):
            try:
                lines = open(f).read().splitlines()
            except OSError:
                continue
            for i in range(len(lines) - 1, -1, -1):
                if pat.match(lines[i]) and want(lines[i]):
                    return f"{f}:{i + 1}"
    return "unknown source"


def validate(gin_files: list[str], bindings: list[str]) -> None:
    """Every bound value against its parameter's annotation; the entry point's gin.REQUIRED values bound."""
    errors = []
    for (scope, selector), params in sorted(gin.config._CONFIG.items()):  # noqa: SLF001
        if selector == "gin.macro":
            continue
        hints = _hints(selector)
        for param, v in params.items():
            macro, seen = _macro_name(v), set()
            while _macro_name(v) and _macro_name(v) not in seen:  # %MACRO (possibly chained) -> its value
                seen.add(_macro_name(v))
                v = gin.query_parameter("%" + _macro_name(v))
            if param in hints and not _type_ok(v, hints[param]):
                t = hints[param]
                name = f"{scope + '/' if scope else ''}{selector}.{param}"
                via = f" (via macro %{macro})" if macro else ""
                where = _where(gin_files, bindings, scope, selector, param, macro)
                errors.append(f"{name} = {v!r}{via}: expected {_tname(t)}, got {type(v).__name__}; set in {where}")
    try:
        fn = gin.config._REGISTRY.get_match(ENTRY_POINT).wrapped  # noqa: SLF001
        required = [n for n, p in inspect.signature(fn).parameters.items() if p.default is gin.REQUIRED]
    except Exception:  # noqa: BLE001
        required = []
    for name in required:
        try:
            gin.query_parameter(f"{ENTRY_POINT}.{name}")
        except ValueError:
            errors.append(f"missing required value {ENTRY_POINT}.{name}: no binding in {', '.join(gin_files)} "
                          f"or on the command line (e.g. the model .gin file binds {ENTRY_POINT}.model)")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
