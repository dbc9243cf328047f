"""Several checkpoints side by side: the same eval tokens for each, then the same prompt and seed.

The data is chosen once, from the first checkpoint (its held-out chunks unless a cache or source is
given), and every other checkpoint reads the same ids; one whose tokenizer differs gets the same
text tokenized its own way when the data is a source, and is refused otherwise (bits per byte
compare across tokenizers only over the same text). Checkpoints are loaded one at a time, so
comparing big models needs the memory of one.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

from engine import generate
from engine import protocol as P
from engine.eval_data import EvalData, for_model, plan, select
from engine.evaluate import run_eval
from engine.inference import LoadedModel
from engine.paths import Layout
from engine.use_output import Output

COLUMNS = (("Checkpoint", "checkpoint"), ("Step", "step"), ("Tokens seen", "tokens_seen"), ("Loss", "loss"),
           ("Perplexity", "perplexity"), ("BPB", "bpb"), ("Top-1", "top1"), ("Top-5", "top5"))


def compare(layout: Layout, refs: list[str], params: P.SamplingParams, prompt: str, *, batches: int | None,
            cache: str | None, source: str | None, load: Callable[[str], LoadedModel]) -> dict[str, Any]:
    """{"data", "prompt", "seed", "results": [EvalResult dicts], "samples": [{checkpoint, text, reason}]}."""
    notes = Output(False)

    def note(event: P.Event) -> None:
        if isinstance(event, (P.Warning, P.ModelLoaded)):
            notes(event)

    data: EvalData | None = None
    batch_size = 1
    results, samples = [], []
    for ref in refs:
        loaded = load(ref)
        note(loaded.loaded_event())
        if data is None:
            count, batch_size = plan(loaded, layout, batches)
            data = select(loaded, layout, count, cache=cache, source=source)
        result = run_eval(loaded, for_model(data, loaded, layout), layout, batch_size, emit=note)
        assert result is not None  # nothing interrupts it here
        results.append(P.to_dict(result))
        done = generate.run(loaded, generate.encode(loaded, prompt), params, emit=note)[0]
        samples.append({"checkpoint": loaded.display_name, "text": done.text, "reason": done.reason})
        del loaded
        gc.collect()
    assert data is not None
    return {"data": data.label, "prompt": prompt, "seed": params.seed, "results": results, "samples": samples}


def print_comparison(report: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 1000)
    table = Table(title=f"Eval on {report['data']}", box=box.SIMPLE_HEAD)
    for title, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "Checkpoint" else "right")
    for r in report["results"]:
        table.add_row(r["checkpoint"], f"{r['step']:,}", f"{r['tokens_seen']:,}", f"{r['loss']:.4f}",
                      f"{r['perplexity']:,.2f}", f"{r['bpb']:.4f}", f"{100 * r['top1']:.2f}%",
                      f"{100 * r['top5']:.2f}%")
    console.print(table)
    shown = repr(report["prompt"]) if report["prompt"] else "(a new document)"
    console.print(f"Samples from the prompt {shown}, seed {report['seed']}:", markup=False, highlight=False)
    for s in report["samples"]:
        console.print(f"\n--- {s['checkpoint']} ---", markup=False, highlight=False)
        console.print(report["prompt"] + s["text"], markup=False, highlight=False)
