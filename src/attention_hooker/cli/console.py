"""Progress bars on the terminal: over the lines of a file, and over the tokens ``generate`` adds.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import contextlib
import sys



@contextlib.contextmanager
def generation_progress(new_tokens: int, stream=None):
    """A tqdm bar over the generated tokens, fed by ``generate()``'s streamer hook (one
    ``put`` for the prompt, then one per new token)."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    bar = tqdm(total=new_tokens, desc="generating", unit=" tokens", file=stream or sys.stderr, leave=False)

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
    """tqdm's bar on ``stream`` (stderr by default), counting lines."""
    from tqdm.auto import tqdm  # installed with transformers, which the command line needs

    return tqdm(total=total, file=stream or sys.stderr, unit=" lines", desc=label, leave=True, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} lines [{elapsed}<{remaining}, "
                           "{rate_fmt}]")
