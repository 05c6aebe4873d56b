"""Progress of a long compile on stderr: a live line on a terminal, plain lines anywhere else.

`stage_progress(console)` is a context manager yielding `progress(stage, detail=None)`, the
callback `compile_model` and the pass driver call: `stage` when one begins (capture T=256, each
pass per bucket and variant, dumps, plan write), `detail` within a long one (capture: the layer
being traced).

  terminal   one rich live line: spinner, stage, detail, seconds since the start. The clock is a
             column drawn on every refresh (10 a second), so it ticks within a stage instead of
             freezing at the value of the last update.
  otherwise  (CI, a log file) one line per stage, flushed at once:
                 tbo-compile: [  3.2 s] capture T=256
             plus a detail line at most every DETAIL_EVERY_S seconds, so a 40 s capture of a
             61-layer model still shows it is alive without a line per layer.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn
from rich.text import Text

DETAIL_EVERY_S = 5.0

ProgressFn = Callable[..., None]   # progress(stage: str, detail: str | None = None)


class _Seconds(ProgressColumn):
    """Seconds since the start, computed when the line is drawn, not when the stage changed."""

    def render(self, task) -> Text:
        return Text(f"{task.elapsed or 0.0:5.1f} s", style="progress.elapsed")


@contextmanager
def stage_progress(console: Console | None = None, *, prog: str = "tbo-compile",
                   first: str = "starting") -> Iterator[ProgressFn]:
    """`first`: what the live line says before the first stage (a log gets no line for it, so a
    compile that fails before its first stage writes nothing but its error)."""
    console = console or Console(stderr=True)
    if console.is_terminal:
        with Progress(SpinnerColumn(), TextColumn(f"[bold]{prog}[/] {{task.description}}"), _Seconds(),
                      console=console, transient=True) as bar:
            task = bar.add_task(escape(first))

            def live(stage: str, detail: str | None = None) -> None:
                text = escape(stage) + (f" [dim]{escape(detail)}[/]" if detail else "")
                bar.update(task, description=text, refresh=True)
            yield live
        return

    t0 = time.perf_counter()
    last = [float("-inf")]   # when the last line was printed

    def plain(stage: str, detail: str | None = None) -> None:
        now = time.perf_counter()
        if detail and now - last[0] < DETAIL_EVERY_S:
            return
        last[0] = now
        print(f"{prog}: [{now - t0:5.1f} s] {stage}" + (f": {detail}" if detail else ""),
              file=console.file, flush=True)
    yield plain


__all__ = ["stage_progress", "ProgressFn", "DETAIL_EVERY_S"]
