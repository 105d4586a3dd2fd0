"""The route groups the API serves, one `Feature` each.

A feature is a function `routes(components) -> list[BaseRoute] | FeatureRoutes`, named by
"module:function" and imported only when the API starts, so a feature whose optional
dependency is missing is skipped with a log line naming the extra to install, and the others
still serve. A feature that is switched off in the config returns no routes. `FeatureRoutes`
adds an async context manager entered before the server starts and left after it stops (e.g.
a session manager's task group).

To add a feature: write its module under `gatewayd/api/` (or anywhere), add one line below.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import BaseRoute

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    target: str  # "module:function"
    extra: str | None = None  # the pip extra that installs its dependencies


@dataclass(slots=True)
class FeatureRoutes:
    routes: list[BaseRoute]
    lifespan: AbstractAsyncContextManager[Any] | None = None
    # What the feature serves, for the start-up log line ("/v1/chat/completions ...").
    summary: str = ""
    extra_fields: dict[str, Any] = field(default_factory=dict)


FEATURES: tuple[Feature, ...] = (Feature("index", "gatewayd.api.index:routes"),)


def load_features(
    components: Any, features: Sequence[Feature] = FEATURES
) -> dict[str, FeatureRoutes]:
    """Each feature's routes, by name; features with no routes (switched off) are left out."""
    loaded: dict[str, FeatureRoutes] = {}
    for feature in features:
        module_name, _, function_name = feature.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            hint = (
                f"; install it with pip install 'gatewayd[{feature.extra}]'"
                if feature.extra
                else ""
            )
            log.warning("api: feature %s is not available (%s)%s", feature.name, err, hint)
            continue
        made = getattr(module, function_name)(components)
        routes = made if isinstance(made, FeatureRoutes) else FeatureRoutes(list(made))
        if routes.routes:
            loaded[feature.name] = routes
    return loaded
