"""Terminal progress for a pipeline run: one tqdm bar per stage, milestones printed above the bars."""

from collections.abc import Callable

from tqdm import tqdm

from app.distill.hooks import Hooks, Progress


class ProgressBars:
    """Draws the current stage's bar; `hooks()` gives the pipeline callbacks, `close()` ends the last bar."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._stage: str | None = None

    def show(self, progress: Progress) -> None:
        """Move the bar of progress.stage, starting a new bar when the stage changes."""
        if progress.stage != self._stage:
            self.close()
            self._stage = progress.stage
            self._bar = tqdm(total=progress.total, desc=progress.stage, unit="step")
        assert self._bar is not None
        self._bar.total = progress.total
        self._bar.n = progress.step
        if progress.loss is not None:
            self._bar.set_postfix(loss=f"{progress.loss:.4f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Finish the current bar, if any."""
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None

    def hooks(self, should_cancel: Callable[[], bool] | None = None) -> Hooks:
        """Pipeline hooks that draw these bars and print events."""
        return Hooks(
            on_progress=self.show,
            on_event=lambda stage, message: tqdm.write(f"[{stage}] {message}"),
            should_cancel=should_cancel,
        )
