"""How a pipeline talks to its caller: progress reports, milestone events and cancellation."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace


@dataclass
class Progress:
    """Where a stage stands.

    `stage` is 'prepare' | 'teacher:<name>' | 'soft_labels' | 'stage1:<variant>[/member-<i>]'
    | 'stage2:<variant>[/member-<i>]' | 'evaluate' | 'export'; `fraction` is the whole pipeline's progress.
    """

    stage: str
    step: int
    total: int
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fraction: float = 0.0


class Cancelled(Exception):
    """The caller asked to stop; the last checkpoint was saved, so a rerun continues from it."""


@dataclass
class Hooks:
    """Callbacks of one pipeline run; each is optional.

    on_safe_point is called after each progress report and event: the run's files are whole then (no checkpoint
    half written), a moment for a worker to copy them. Where other processes write the run's files (students
    trained side by side), `without_safe_points()` reports without it, and their supervisor pauses them for a
    safe point when they wrote something new, at most once every safe_point_every_s seconds.
    """

    on_progress: Callable[[Progress], None] | None = None
    on_event: Callable[[str, str], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_safe_point: Callable[[], None] | None = None
    safe_point_every_s: float = 0.0

    def progress(self, progress: Progress) -> None:
        """Report progress to the caller, if it listens."""
        if self.on_progress is not None:
            self.on_progress(progress)
        self.safe_point()

    def event(self, stage: str, message: str) -> None:
        """Report a human-readable milestone, if the caller listens."""
        if self.on_event is not None:
            self.on_event(stage, message)
        self.safe_point()

    def safe_point(self) -> None:
        """Tell the caller that the run's files are whole now."""
        if self.on_safe_point is not None:
            self.on_safe_point()

    def without_safe_points(self) -> "Hooks":
        """These hooks, reporting without telling the caller the files are whole."""
        return replace(self, on_safe_point=None)

    def cancel_requested(self) -> bool:
        """Whether the caller wants the run to stop now."""
        return self.should_cancel is not None and bool(self.should_cancel())
