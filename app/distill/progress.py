"""Terminal progress for a pipeline run: one tqdm bar per stage, milestones printed above the bars."""

from collections.abc import Callable

from tqdm import tqdm

from app.distill.hooks import Hooks, Progress


class ProgressBars:
    """A bar per running stage (students may train side by side); `hooks()` gives the pipeline callbacks,
    `close()` ends the bars still open."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def show(self, progress: Progress) -> None:
        """Move the bar of progress.stage, starting it on the stage's first report and closing it at its last step."""
        bar = self._bars.get(progress.stage)
        if bar is None:
            bar = self._bars[progress.stage] = tqdm(total=progress.total, desc=progress.stage, unit="step")
        bar.total = progress.total
        bar.n = progress.step
        if progress.loss is not None:
            bar.set_postfix(loss=f"{progress.loss:.4f}", refresh=False)
        bar.refresh()
        if progress.step >= progress.total:
            self._bars.pop(progress.stage).close()

    def close(self) -> None:
        """Finish the bars still open, if any."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def hooks(self, should_cancel: Callable[[], bool] | None = None) -> Hooks:
        """Pipeline hooks that draw these bars and print events."""
        return Hooks(
            on_progress=self.show,
            on_event=lambda stage, message: tqdm.write(f"[{stage}] {message}"),
            should_cancel=should_cancel,
        )
