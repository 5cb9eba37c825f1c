"""Students trained side by side on a multi-core CPU: the variants split over child processes, each with its share
of the threads.

A training step of a compact student is too small to keep many threads busy: on a 2-core AMD EPYC, two MiniLM
training loops on one thread each did 1.13x the steps of one loop on two threads. Threads in one process would not
do: the students' dropout draws from torch's one random generator. Each child gets the run's data, soft labels and
reference embeddings in a file, trains its variants' stages into out_dir/checkpoints (the folders a sequential run
uses, so either kind of run resumes the other's) and talks to the parent in JSON lines: progress and events on its
stdout; the parent sends "pause" (the child answers "paused" between two steps and waits for "go") and "cancel"
on its stdin. A child whose stdin closes (the parent died) stops at its next step.

Only the parent calls the caller's hooks, without safe points: a child may be writing a checkpoint at any moment.
When a child has written a new one, the parent pauses them all and calls `hooks.safe_point()` (where a worker
copies the run folder to the store), at most once every `hooks.safe_point_every_s`. The children's students are
then loaded by the sequential code, which finds each stage trained.
"""

import argparse
import json
import os
import select
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from app.distill.hooks import Cancelled, Hooks, Progress

CANCELLED_EXIT = 3
MIN_STUDENT_STEPS = 200
"""Below this many student steps in all, a child's start (torch, the data file: seconds) costs more than it saves."""
STOP_TIMEOUT_S = 30.0


def plan(steps: dict[str, float], threads: int, processes: int | None) -> list[list[str]]:
    """The variants of each child, heaviest first on the least loaded (`steps`: each variant's student steps, in
    the spec's order); [] to train them in this process: one variant, one thread, too few steps, or processes=1.

    processes=None picks one child per thread, at most one per variant.
    """
    count = min(len(steps), threads if processes is None else processes)
    if count < 2 or (processes is None and sum(steps.values()) < MIN_STUDENT_STEPS):
        return []
    groups: list[list[str]] = [[] for _ in range(count)]
    totals = [0.0] * count
    for variant in sorted(steps, key=lambda v: -steps[v]):
        least = totals.index(min(totals))
        groups[least].append(variant)
        totals[least] += steps[variant]
    return groups


def train_side_by_side(groups: list[list[str]], arguments: dict[str, Any], *, threads: int, hooks: Hooks) -> None:
    """Train the variants of `groups` in one child process each (threads // len(groups) threads apiece).

    `arguments` are those of `train_variant` but the variant and hooks; the caller's hooks get the children's
    progress and events. Raises Cancelled when the caller cancels (each child saved a checkpoint first),
    RuntimeError when a child fails.
    """
    per_child = max(1, threads // len(groups))
    split = "; ".join(", ".join(group) for group in groups)
    threads_each = f"{per_child} thread" + ("s" if per_child > 1 else "")
    hooks.event("students", f"training the students side by side in {len(groups)} processes of {threads_each}: {split}")
    with tempfile.TemporaryDirectory(prefix="qadistill-students-") as folder:
        task = Path(folder) / "task.pt"
        torch.save(arguments, task)
        children = [_Child.start(task, group, per_child) for group in groups]
        try:
            _supervise(children, Path(arguments["out_dir"]), hooks)
        finally:
            for child in children:
                child.stop()


class _Child:
    """One child process and the unread part of its output."""

    def __init__(self, process: subprocess.Popen[bytes], variants: list[str]) -> None:
        self.process, self.variants = process, variants
        self.buffer = b""
        self.paused = False
        self.exit_code: int | None = None

    @classmethod
    def start(cls, task: Path, variants: list[str], threads: int) -> "_Child":
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "app.distill.side_by_side", str(task), "--threads", str(threads), *variants]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return cls(process, variants)

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def send(self, command: str) -> None:
        """Write a command line; a child that already exited no longer reads."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(f"{command}\n".encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass

    def read(self) -> list[dict[str, Any]]:
        """The messages available on its stdout; at its end, the exit code is set."""
        assert self.process.stdout is not None
        chunk = os.read(self.process.stdout.fileno(), 1 << 16)
        if not chunk:
            self.exit_code = self.process.wait()
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        """End the process if it still runs: SIGTERM, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def _supervise(children: list[_Child], out_dir: Path, hooks: Hooks) -> None:
    """Relay the children's reports until they all exit; pause them for a safe point after each new checkpoint."""
    quiet = hooks.without_safe_points()
    selector = selectors.DefaultSelector()
    for child in children:
        assert child.process.stdout is not None
        selector.register(child.process.stdout, selectors.EVENT_READ, child)
    cancelling = pausing = False

    # Only a caller that copies the files needs the children paused, no more often than it copies them.
    def pause_due(last: float) -> bool:
        return hooks.on_safe_point is not None and time.monotonic() - last >= hooks.safe_point_every_s

    seen = _checkpoints(out_dir)
    last_pause = time.monotonic()
    while any(child.running for child in children):
        for key, _ in selector.select(timeout=0.5):
            child = key.data
            for message in child.read():
                if "progress" in message:
                    quiet.progress(Progress(**message["progress"]))
                elif "event" in message:
                    quiet.event(*message["event"])
                elif "paused" in message:
                    child.paused = True
            if not child.running:
                selector.unregister(key.fileobj)
        failed = [c for c in children if c.exit_code not in (None, 0, CANCELLED_EXIT)]
        if failed:
            raise RuntimeError(
                f"the child process training {', '.join(failed[0].variants)} failed (exit code "
                f"{failed[0].exit_code}); its traceback is in the log"
            )
        live = [c for c in children if c.running]
        if not cancelling and hooks.cancel_requested():
            # A paused child saves a checkpoint as it stops: no safe point until they all exit.
            cancelling, pausing = True, False
            for child in live:
                child.send("cancel")
        if pausing and all(c.paused for c in live):
            hooks.safe_point()
            for child in live:
                child.paused = False
                child.send("go")
            pausing, last_pause = False, time.monotonic()
        elif not (pausing or cancelling) and pause_due(last_pause) and (now := _checkpoints(out_dir)) != seen:
            seen, pausing = now, True
            for child in live:
                child.send("pause")
    if any(child.exit_code == CANCELLED_EXIT for child in children):
        raise Cancelled("cancelled while the students trained side by side")
    hooks.safe_point()


def _checkpoints(out_dir: Path) -> dict[str, int]:
    """Each student checkpoint pointer's modification time: it changes when a checkpoint is written (the pointer
    is replaced whole, never missing once written)."""
    return {str(p): p.stat().st_mtime_ns for p in (out_dir / "checkpoints").glob("stage*/**/latest")}


class _Parent:
    """A child's side of the conversation: its reports go to the parent; commands come from its stdin."""

    def __init__(self, output: IO[str]) -> None:
        self.output = output
        self.stdin = sys.stdin.fileno()
        self.buffer = b""
        self.cancelled = False

    def send(self, message: dict[str, Any]) -> None:
        self.output.write(json.dumps(message) + "\n")
        self.output.flush()

    def progress(self, progress: Progress) -> None:
        self.send({"progress": {k: getattr(progress, k) for k in ("stage", "step", "total", "loss", "metrics")}})

    def event(self, stage: str, message: str) -> None:
        self.send({"event": [stage, message]})

    def should_cancel(self) -> bool:
        """Called between two steps: take the parent's commands, waiting while it holds the children paused."""
        waiting = False
        while not self.cancelled:
            ready, _, _ = select.select([self.stdin], [], [], None if waiting else 0)
            if not ready:
                break
            chunk = os.read(self.stdin, 1 << 12)
            if not chunk:  # the parent is gone: stop at this step, checkpoint saved
                self.cancelled = True
                break
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in (line.decode().strip() for line in lines):
                if line == "cancel":
                    self.cancelled = True
                elif line == "pause":
                    waiting = True
                    self.send({"paused": True})
                elif line == "go":
                    waiting = False
            if not waiting and not self.buffer:
                break
        return self.cancelled


def main(argv: Sequence[str] | None = None) -> None:
    """A child: train the named variants' students from the task file; exit CANCELLED_EXIT when cancelled."""
    parser = argparse.ArgumentParser(description="Train students for a parent process (not for direct use).")
    parser.add_argument("task", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The messages keep the real stdout; anything a library prints goes to stderr, the log.
    output = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    parent = _Parent(output)

    from app.distill.pipeline import train_variant

    arguments = torch.load(args.task, weights_only=False)
    hooks = Hooks(on_progress=parent.progress, on_event=parent.event, should_cancel=parent.should_cancel)
    try:
        for variant in args.variants:
            train_variant(variant=variant, hooks=hooks, calibrate=False, **arguments)
    except Cancelled:
        sys.exit(CANCELLED_EXIT)


if __name__ == "__main__":
    main()
