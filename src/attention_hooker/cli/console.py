"""Progress on the terminal: over the lines of a file, the pictures drawn, and the tokens ``generate``
adds. On a terminal, tqdm's bar; written to a file or a pipe, a few whole lines (a bar redrawn with
carriage returns would leave the first line of the summary on the bar's line).
"""

from __future__ import annotations

import contextlib
import sys
import time


def progress(iterable=None, *, total=None, desc: str, unit: str, stream=None, leave: bool = False,
             bar_format=None, disable: bool = False, steps: int = 4):
    """tqdm's bar on ``stream`` (stderr by default) when it is a terminal; otherwise a
    :class:`LineProgress` that writes one whole line at each quarter (``steps``) and at the end."""
    stream = stream or sys.stderr
    if _is_terminal(stream):
        from tqdm.auto import tqdm  # installed with transformers, which the command line needs

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True,
                    bar_format=bar_format, disable=disable)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, bar_format=bar_format,
                        disable=disable, steps=steps)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or a file-like stream
        return False


class LineProgress:
    """Progress as whole lines, for a log: tqdm's own wording (``pictures: 3/6 [00:02<00:02, 1.2 layers/s]``),
    each line ended, written when a quarter more is done and once at the end."""

    def __init__(self, iterable=None, *, total=None, desc: str, unit: str, stream, bar_format=None,
                 disable: bool = False, steps: int = 4):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.stream, self.bar_format = desc, unit, stream, bar_format
        self.disable, self.steps = disable, max(1, steps)
        self.n, self._shown, self._start, self._closed = 0, 0, time.perf_counter(), False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or not self.total:
            return
        step = self.n * self.steps // self.total
        if step > self._shown and self.n < self.total:
            self._shown = step
            self._write()

    def _write(self) -> None:
        from tqdm import tqdm

        line = tqdm.format_meter(self.n, self.total, time.perf_counter() - self._start, prefix=self.desc,
                                 unit=self.unit, bar_format=self.bar_format)
        self.stream.write(line.replace("\r", "") + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self._closed and not self.disable and self.n:
            self._write()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False



@contextlib.contextmanager
def generation_progress(new_tokens: int, stream=None):
    """A tqdm bar over the generated tokens, fed by ``generate()``'s streamer hook (one
    ``put`` for the prompt, then one per new token)."""
    from transformers.generation.streamers import BaseStreamer

    bar = progress(total=new_tokens, desc="generating", unit=" tokens", stream=stream)

    class Progress(BaseStreamer):
        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                bar.update(1)
            self.prompt_seen = True

        def end(self):
            pass

    with bar:
        yield Progress()


def progress_bar(total: int, stream=None, label: str = "lines"):
    """Progress over lines on ``stream`` (stderr by default): see :func:`progress`."""
    return progress(total=total, stream=stream, unit=" lines", desc=label, leave=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} lines [{elapsed}<{remaining}, "
                               "{rate_fmt}]")
