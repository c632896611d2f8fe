"""What every task of one build shares: the validated recipe, where to track, and how far reuse goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaptflow import stages
from adaptflow.recipe import Recipe
from adaptflow.tracking.runs import TrackingTarget


@dataclass(frozen=True)
class BuildContext:
    """Small and frozen: it is passed to every task of the build."""

    recipe: Recipe
    tracking: TrackingTarget
    experiment_id: str
    build_run_id: str
    progress: bool = False
    reuse: bool = True  # reuse finished stages with the same cache key
    recompute_from: str | None = None  # …except this stage and those after it (a rerun's --from)

    def may_reuse(self, stage: str) -> bool:
        if not self.reuse:
            return False
        return self.recompute_from is None or stages.comes_before(stage, self.recompute_from)

    @property
    def workdir(self) -> Path:
        return Path(self.recipe.workdir).resolve()

    @property
    def cache_dir(self) -> str:
        """The token store (`tokens.store`, or `<workdir>/cache/tokens`)."""
        return self.recipe.tokens.store or str(self.workdir / "cache" / "tokens")

    @property
    def datasets_dir(self) -> Path:
        return self.workdir / "datasets"
