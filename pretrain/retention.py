"""Checkpoint retention off the training thread, with milestones that are never deleted.

After each published checkpoint, rank 0 decides which older checkpoints go: all but the
newest ``checkpoint.keep_last``, except *milestones*, the iterations that are multiples of
``checkpoint.milestone_interval`` (kept for the whole run, e.g. for data-scaling analyses of
intermediate checkpoints). The doomed directories are first renamed to
``iter_XXXXXXX.deleting`` (one cheap rename each, so nothing looks like a checkpoint any
more), then deleted by a background thread: a multi-terabyte ``rmtree`` no longer stalls
every rank at the next collective. Leftover ``*.deleting`` directories of an interrupted
deletion are removed by the next retention pass. The interpreter waits for the deletions
to finish at exit (the threads are not daemons).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from mm_megatron.checkpoint import format as fmt

DELETING_SUFFIX = ".deleting"
_milestone_interval: int | None = None
_threads: list[threading.Thread] = []
_in_progress: set[Path] = set()
_lock = threading.Lock()


def configure(milestone_interval: int | None) -> None:
    """Set the milestone interval for this process's retention passes."""
    global _milestone_interval
    _milestone_interval = milestone_interval


def is_milestone(iteration: int, milestone_interval: int | None = None) -> bool:
    """Whether ``iteration`` is a milestone that retention keeps."""
    interval = milestone_interval if milestone_interval is not None else _milestone_interval
    return bool(interval) and iteration > 0 and iteration % interval == 0


def doomed(
    complete: list[int], keep_last: int | None, newest: int, milestone_interval: int | None = None
) -> list[int]:
    """Iterations to delete: up to ``newest``, all but the last ``keep_last``, no milestone."""
    if keep_last is None:
        return []
    older = sorted(i for i in complete if i <= newest)[:-keep_last]
    return [i for i in older if not is_milestone(i, milestone_interval)]


def _delete(paths: list[Path], log: Callable[[str], None] | None) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        with _lock:
            _in_progress.discard(path)
    if log is not None and paths:
        log(f"retention: deleted {', '.join(p.name for p in paths)} in the background")


def schedule(
    root: Path,
    keep_last: int | None,
    newest: int,
    list_checkpoints: Callable[[Path], list[int]],
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Rename the checkpoints retention drops and delete them in a background thread.

    Returns the renamed directories. ``list_checkpoints`` lists the complete checkpoints.
    """
    with _lock:
        renamed = [
            p
            for p in sorted(root.glob(f"iter_*{DELETING_SUFFIX}"))
            if p.is_dir() and p not in _in_progress
        ]
    for iteration in doomed(list_checkpoints(root), keep_last, newest):
        path = fmt.iteration_dir(root, iteration)
        target = path.with_name(path.name + DELETING_SUFFIX)
        try:
            path.rename(target)
        except OSError:
            continue  # already gone
        renamed.append(target)
    if renamed:
        thread = threading.Thread(target=_delete, args=(renamed, log), name="checkpoint-retention")
        with _lock:
            _threads[:] = [t for t in _threads if t.is_alive()]
            _threads.append(thread)
            _in_progress.update(renamed)
        thread.start()
    return renamed


def wait(timeout: float | None = None) -> None:
    """Wait for the background deletions started so far."""
    with _lock:
        threads = list(_threads)
    for thread in threads:
        thread.join(timeout)
