"""MAGNET (Ahia et al. 2024; spec: shared/reference/boundaries.md §D, §E, §9-10): the DTP hourglass
(``models.common.HourglassLM``) with one Gumbel boundary predictor per route, each with its own binomial prior
(``DTPConfig.priors``, one α per route in route-id order). Every predictor is computed; each byte takes the
one of its route (no batch split). ``DTPConfig.routing``:

    'script' : per byte, the causal Unicode-script route of the bytes so far (MAGNET per-byte);
    'doc'    : per sequence, the document's dominant script group (MAGNET's script-label routing);
    'lang'   : per sequence, the document's language label (one route per language).

``DTPConfig.script_groups`` names the grouping in ``hnet.scripts.GROUPINGS`` ('magnet': latin, cyrl, deva,
other; 'ntrex': one group per script of NTREX's 22 languages), or for 'lang' the language set in
``hnet.scripts.LANGUAGE_SETS``; ``DTPConfig.route_names`` must be its names. The routes are per-byte data
annotations (``train.annotations``): batch['script_routes' | 'doc_routes'] ('magnet') or
batch['script_routes_<groups>' | 'doc_routes_<groups>' | 'lang_routes_<groups>']. Generation feeds each fed
byte's route through ``decode_trackers`` (``RouteTracker``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hnet.bytes import BOS
from hnet.premium import INVENTORY_MODELS, premium_estimates
from hnet.scripts import GROUPINGS, LANGUAGE_SETS, byte_routes, dominant_route
from models.common import DTPConfig, HourglassLM

_ROUTE_KEYS = {"script": "script_routes", "doc": "doc_routes", "lang": "lang_routes"}


def route_key(routing: str, script_groups: str = "magnet") -> str:
    """Batch key of the per-byte route ids of a routing ('script' | 'doc' | 'lang') and grouping."""
    key = _ROUTE_KEYS[routing]
    return key if script_groups == "magnet" else f"{key}_{script_groups}"


class RouteTracker:
    """Host-side route of each fed byte of one row (generation): a fixed document route, or with ``groups`` the
    causal script route of the bytes so far, as the ``script_routes`` annotation gives it (BOS: route 0; then
    ``hnet.scripts.byte_routes``, prefix-stable). With ``premium_model`` (a model of ``hnet.premium``) it gives
    (route, π̂): the byte premium estimated from the bytes so far, as the ``premium_<m>`` annotation does (BOS: 0).
    O(row length) per byte."""

    def __init__(self, groups=None, route: int = 0, premium_model=None):
        self.groups, self.route, self.premium_model, self.content = groups, route, premium_model, bytearray()

    def push(self, byte: int):
        if not (byte == BOS and not self.content):
            self.content.append(byte)
        route = self.route if self.groups is None else (
            int(byte_routes(bytes(self.content), self.groups)[-1]) if self.content else 0)
        if self.premium_model is None:
            return route
        return route, float(premium_estimates(bytes(self.content), self.premium_model)[-1]) if self.content else 0.0


class MagnetLM(HourglassLM):
    """The DTP hourglass with routed boundary predictors; see the module docstring."""

    def check(self, cfg: DTPConfig) -> None:
        super().check(cfg)
        if cfg.routing not in _ROUTE_KEYS:
            raise ValueError(f"MAGNET routes by 'script', 'doc' or 'lang', got {cfg.routing!r} "
                             "(one predictor is models.DTPLM)")
        names = tuple((LANGUAGE_SETS if cfg.routing == "lang" else GROUPINGS)[cfg.script_groups])
        if tuple(cfg.route_names) != names:
            raise ValueError(f"route_names {cfg.route_names} must be the {cfg.script_groups!r} routes {names}")

    def required_annotations(self) -> tuple[str, ...]:
        return (route_key(self.config.routing, self.config.script_groups),) + super().required_annotations()

    def routes(self, batch):
        return batch[route_key(self.config.routing, self.config.script_groups)].astype(jnp.int32)

    def route_metrics(self, route_BxL, real_BxL, e_BxL, prior_loss_R) -> dict[str, jax.Array]:
        """bytes_per_chunk_<route> (nan when the batch has no byte of the route: not 0, which would read as
        "no chunks") and, with a prior, prior_loss_<route>."""
        metrics = {}
        for r, name in enumerate(self.config.route_names):
            m = real_BxL & (route_BxL == r)
            metrics[f"bytes_per_chunk_{name}"] = jnp.where(jnp.any(m), jnp.sum(m) / jnp.maximum(jnp.sum(e_BxL & m), 1),
                                                           jnp.nan)
            if prior_loss_R is not None:
                metrics[f"prior_loss_{name}"] = prior_loss_R[r]
        return metrics

    def decode_trackers(self, prompts: list[bytes], langs: list[str] | None = None) -> list[RouteTracker]:
        """The host-side route of every fed byte, one tracker per row (train.generate): 'script': the causal
        script route of the row so far; 'doc': the prompt's dominant script group (the forward's is the whole
        document's); 'lang': the index of the row's language in ``langs``."""
        cfg = self.config
        if cfg.routing == "lang":
            if not langs or len(langs) != len(prompts) or any(g not in cfg.route_names for g in langs):
                raise ValueError(f"a language-routed model samples with one language per prompt from "
                                 f"{list(cfg.route_names)}; got {langs!r} for {len(prompts)} prompts")
            return [RouteTracker(route=list(cfg.route_names).index(g)) for g in langs]
        groups = GROUPINGS[cfg.script_groups]
        premium = INVENTORY_MODELS[cfg.premium_model] if cfg.premium_routes else None
        if cfg.routing == "doc":
            return [RouteTracker(route=dominant_route(p, groups), premium_model=premium) for p in prompts]
        return [RouteTracker(groups=groups, premium_model=premium) for _ in prompts]
