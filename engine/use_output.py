"""Where the events of eval, generate, chat, compare and serve-model go: JSON lines on stdout
(`--events`, what the TUI reads), or text for a person. For a person, stdout carries only what was
asked for (the generated text as it streams, the results) and everything else goes to stderr, so
`packtrain-engine generate ... > out.txt` holds exactly the sample.
"""

from __future__ import annotations

import sys
from typing import IO

from engine import protocol as P


def format_result(r: P.EvalResult) -> str:
    return (f"{r.checkpoint} on {r.data}:\n"
            f"  loss {r.loss:.4f} | perplexity {r.perplexity:,.2f} | {r.bpb:.4f} bits/byte | "
            f"top-1 {100 * r.top1:.2f}% | top-5 {100 * r.top5:.2f}% | {r.tokens:,} tokens at "
            f"{r.tokens_per_sec:,.0f} tok/s")


class Output:
    def __init__(self, events: bool, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.events = events
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def __call__(self, event: P.Event) -> None:
        if self.events:
            self._write(self.out, P.encode(event) + "\n")
        elif isinstance(event, P.Token):
            self._write(self.out, event.text)
        elif isinstance(event, P.GenerationStarted) and event.samples > 1:
            self._write(self.out, f"{'' if event.sample == 0 else chr(10)}--- sample {event.sample + 1}/"
                                  f"{event.samples} (seed {event.seed}) ---\n")
        elif isinstance(event, P.GenerationDone):
            self._write(self.out, "\n")
            if event.reason == "interrupted":
                self._write(self.err, "(stopped)\n")
        elif isinstance(event, P.EvalResult):
            self._write(self.out, format_result(event) + "\n")
        elif isinstance(event, P.ModelLoaded):
            self._write(self.err, f"Loaded {event.checkpoint} ({event.n_params:,} parameters, context "
                                  f"{event.context:,}) on {event.device} in {event.seconds:.1f}s\n")
        elif isinstance(event, P.Warning):
            self._write(self.err, f"warning: {event.message}\n")
        elif isinstance(event, (P.Error, P.Done)) and getattr(event, "message", ""):
            self._write(self.err, f"error: {event.message}\n")

    @staticmethod
    def _write(stream: IO[str], text: str) -> None:
        stream.write(text)
        stream.flush()
