"""gin CLI handling (t5x style): several --gin_file, --gin.KEY=value overrides, clear errors before
any compilation for unknown or misspelled bindings (listing the valid parameters)."""

from __future__ import annotations

import inspect
import re

import gin

import train.loop  # noqa: F401  (registers train.train / DataConfig / OptimizerConfig)
import train.registry  # noqa: F401  (registers models)


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
