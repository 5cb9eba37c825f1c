"""Students trained side by side in child processes: the same students as in one process, progress and events
relayed, safe points only while the children are paused, cancellation that resumes, a failing child reported."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.distill import Cancelled, Hooks, run_pipeline
from app.distill.side_by_side import plan, train_side_by_side
from app.distill.train import DONE_MARKER
from tests.unit.helpers import Recorder, tiny_spec
from workers.workspace import folder_fingerprint

STEPS = {"kd": 100.0, "mkd": 100.0, "tkd": 250.0, "tmkd": 250.0}  # stage 1 and 2 of each variant


def test_plan_puts_the_heaviest_variants_apart_and_keeps_small_runs_in_process() -> None:
    assert plan(STEPS, threads=2, processes=None) == [["tkd", "kd"], ["tmkd", "mkd"]]
    assert plan(STEPS, threads=16, processes=None) == [["tkd"], ["tmkd"], ["kd"], ["mkd"]]
    assert plan(STEPS, threads=16, processes=3) == [["tkd"], ["tmkd"], ["kd", "mkd"]]
    assert plan(STEPS, threads=1, processes=None) == []
    assert plan(STEPS, threads=2, processes=1) == []
    assert plan({"tmkd": 250.0}, threads=2, processes=None) == []
    small = dict.fromkeys(STEPS, 10.0)
    assert plan(small, threads=2, processes=None) == [], "too few steps to pay for the processes"
    assert plan(small, threads=2, processes=2) != [], "asked for explicitly"


def _student_files(result_dir: Path) -> dict[str, torch.Tensor]:
    return {
        f"{member.name}/{file}/{key}": tensor
        for member in sorted(result_dir.glob("member-*"))
        for file in ("model.safetensors", "heads.safetensors")
        for key, tensor in load_file(member / file).items()
    }


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children's count: the same arithmetic in and out of process
    yield
    torch.set_num_threads(threads)


def test_students_trained_side_by_side_are_those_trained_in_process(
    tmp_path: Path, sample_data: Path, one_thread: None
) -> None:
    spec = tiny_spec(tmp_path, sample_data, variants=["kd", "tmkd"], stage1={"max_steps": 60}, stage2={"max_steps": 60})
    cache = tmp_path / "cache"
    alone = run_pipeline(spec, out_dir=tmp_path / "alone", cache_dir=cache, processes=1)

    out = tmp_path / "apart"
    recorder = Recorder()
    paused = []

    def on_safe_point() -> None:
        # Nothing writes the run's files at a safe point (a worker copies them then), children running or not.
        if _side_by_side_processes():
            paused.append(True)
            before = folder_fingerprint(out / "checkpoints")
            time.sleep(0.05)
            assert folder_fingerprint(out / "checkpoints") == before, "a child wrote during a safe point"

    hooks = Hooks(on_progress=recorder.progress.append, on_event=recorder.hooks().on_event, on_safe_point=on_safe_point)
    apart = run_pipeline(spec, out_dir=out, cache_dir=cache, hooks=hooks, processes=2)

    assert recorder.messages("training the students side by side in 2 processes of 1 thread: tmkd; kd")
    for variant in ("kd", "tmkd"):
        expected, got = _student_files(alone.variant_dirs[variant]), _student_files(apart.variant_dirs[variant])
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), variant
    assert [r["map"] for r in apart.metrics["rows"]] == [r["map"] for r in alone.metrics["rows"]]
    # Each child's stages reported through the parent, and the run's fraction never went back.
    finished = recorder.messages("finished")
    assert {"stage1:tmkd", "stage2:tmkd", "stage2:kd"} <= {m.split()[0] for m in finished}
    stages = {p.stage for p in recorder.progress}
    assert {"stage1:tmkd", "stage2:tmkd", "stage2:kd"} <= stages
    fractions = [p.fraction for p in recorder.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(paused) >= 2, "the children were not paused for their checkpoints to be copied"


def _side_by_side_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"app.distill.side_by_side" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_cancelled_side_by_side_run_stops_its_children_and_resumes(
    tmp_path: Path, sample_data: Path, one_thread: None
) -> None:
    long = {"epochs": 50, "max_steps": 400}  # long enough to be cancelled in stage 1
    spec = tiny_spec(tmp_path, sample_data, variants=["kd", "tmkd"], stage1=long, stage2=long)
    cache = tmp_path / "cache"
    seen: set[str] = set()

    def should_cancel() -> bool:
        return "stage1:tmkd" in seen

    hooks = Hooks(on_progress=lambda p: seen.add(p.stage) if p.step > 0 else None, should_cancel=should_cancel)
    with pytest.raises(Cancelled):
        run_pipeline(spec, out_dir=tmp_path / "out", cache_dir=cache, hooks=hooks, processes=2)
    assert _side_by_side_processes() == []
    assert not (tmp_path / "out" / "checkpoints" / "stage1" / "tmkd" / DONE_MARKER).exists()

    recorder = Recorder()
    run_pipeline(spec, out_dir=tmp_path / "out", cache_dir=cache, hooks=recorder.hooks(), processes=2)
    assert any(m.startswith("stage1:tmkd resuming from the checkpoint") for m in recorder.messages("resuming")), (
        recorder.events
    )


def test_a_failing_child_is_reported_with_its_variants(tmp_path: Path) -> None:
    # The child gets no data: it fails at once, and the parent says which variants it was training.
    with pytest.raises(RuntimeError, match=r"the child process training (kd|tmkd) failed \(exit code 1\)"):
        train_side_by_side([["kd"], ["tmkd"]], {"out_dir": tmp_path}, threads=2, hooks=Hooks())
    assert _side_by_side_processes() == []


def test_children_stop_when_their_parent_dies(tmp_path: Path, sample_data: Path) -> None:
    # A worker's pool process killed (the OOM killer): its children read the end of their stdin and stop.
    long = {"epochs": 50, "max_steps": 400}
    spec = tiny_spec(tmp_path, sample_data, variants=["kd", "tmkd"], stage1=long, stage2=long)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    script = (
        "import sys; from pathlib import Path; from app.distill import PipelineSpec, run_pipeline; "
        "run_pipeline(PipelineSpec.model_validate_json(Path(sys.argv[1]).read_text()), out_dir=Path(sys.argv[2]), "
        "processes=2)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "spec.json"), str(tmp_path / "out")])
    try:
        deadline = time.monotonic() + 120
        while not _side_by_side_processes():
            assert parent.poll() is None and time.monotonic() < deadline, "no child process started"
            time.sleep(0.1)
        children = _side_by_side_processes()
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _running(pid) for pid in children):
        assert time.monotonic() < deadline, "the children kept training after their parent died"
        time.sleep(0.1)
    assert not (tmp_path / "out" / "checkpoints" / "stage2" / "kd" / DONE_MARKER).exists()


def _running(pid: int) -> bool:
    """Whether the process is alive and not a zombie waiting for its (gone) parent's reaping."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
