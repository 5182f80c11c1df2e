"""The stage protocol and registry.

A stage is registered by the type of its config, so the runner dispatches on
``type(config)`` and never on a string. A stage module registers itself on import with
``@register_stage(MyConfig)``; ``edgekd.pipeline.stages`` imports every stage module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from edgekd.config_base import StrictModel

if TYPE_CHECKING:
    from edgekd.stage.context import RunContext, ValidationContext

ConfigT = TypeVar("ConfigT", bound=StrictModel)


class Stage(ABC, Generic[ConfigT]):
    """One step of the pipeline. ``name`` is the recipe key (``prune``, ``distill``, ...)."""

    name: ClassVar[str]
    #: Under torchrun, a stage that trains runs on every rank (set False); others run on rank 0
    #: only and the runner then broadcasts rank 0's student to the other ranks.
    main_process_only: ClassVar[bool] = True

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def check(self, ctx: ValidationContext) -> None:  # noqa: B027 - optional hook
        """Checks that need the models or data (layer names, shapes) but no training.

        Called by ``edgekd validate`` and before ``compress`` starts; raise
        ``RecipeError`` (with ``key=``) for a problem the user must fix.
        """

    @abstractmethod
    def run(self, ctx: RunContext) -> None:
        """Do the work: update ``ctx.student`` and/or add artifacts, ledger rows, report data."""


_REGISTRY: dict[type[StrictModel], type[Stage]] = {}


def register_stage(config_type: type[StrictModel]):
    """Class decorator: ``@register_stage(PruneConfig) class PruneStage(Stage[PruneConfig])``."""

    def decorate(stage_cls: type[Stage]) -> type[Stage]:
        if config_type in _REGISTRY:
            raise RuntimeError(f"stage config {config_type.__name__} registered twice")
        _REGISTRY[config_type] = stage_cls
        return stage_cls

    return decorate


def stage_for(config: StrictModel) -> Stage:
    """Build the stage object for a config instance (dispatch on its type)."""
    try:
        return _REGISTRY[type(config)](config)
    except KeyError:
        raise RuntimeError(f"no stage registered for {type(config).__name__}") from None


def registered_stages() -> dict[type[StrictModel], type[Stage]]:
    return dict(_REGISTRY)
