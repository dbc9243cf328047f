"""`eval`, `generate`, `chat`, `compare` and `serve-model`: using a trained checkpoint.

Flags are checked before torch is imported, so a bad --top-p is refused at once. Every command
loads through engine.inference (full manifest check first) and reports through engine.use_output:
protocol events with --events, text for a person otherwise.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine import protocol as P
from engine.cache.commands import events_guard
from engine.errors import UserError
from engine.paths import Layout
from engine.use_output import Output

if TYPE_CHECKING:
    from engine.inference import LoadedModel


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    e = sub.add_parser("eval", help="measure a checkpoint: loss, perplexity, bits per byte, top-1/top-5 accuracy",
                       description="Evaluate a checkpoint on its run's held-out chunks (default), on another cache "
                                   "built with its tokenizer, or on any source tokenized with it. Results are kept in "
                                   "checkpoints/<model>/evals.jsonl and shown by `checkpoints list`.")
    _id(e)
    _data_flags(e)
    out = e.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as one JSON object")
    out.add_argument("--events", action="store_true", help="print progress and the result as protocol JSON lines")
    _device_flags(e)
    e.set_defaults(handler=events_guard(cmd_eval))

    g = sub.add_parser("generate", help="sample text from a checkpoint, streamed as it is produced",
                       description="Sample from a checkpoint with transformers' generate (KV cache). No prompt starts "
                                   "a new document. The same --seed gives the same text.")
    _id(g)
    _prompt_flags(g)
    _sampling_flags(g, samples=True)
    g.add_argument("--events", action="store_true", help="print protocol JSON lines (token events) instead of text")
    _device_flags(g)
    g.set_defaults(handler=events_guard(cmd_generate))

    c = sub.add_parser("chat", help="talk to a checkpoint: a prompt loop with history",
                       description="Each line read from stdin is a turn. A model whose tokenizer has a chat template "
                                   "gets the conversation through it; a base model continues the transcript (turns "
                                   "joined with newlines). /reset forgets the history, /quit or end of input ends.")
    _id(c)
    _sampling_flags(c, samples=False)
    _device_flags(c)
    c.set_defaults(handler=cmd_chat)

    m = sub.add_parser("compare", help="evaluate several checkpoints on the same tokens, then sample each",
                       description="One table (step, tokens seen, loss, perplexity, bits per byte, top-1, top-5) on "
                                   "the same data: the first checkpoint's held-out chunks unless --cache/--source; "
                                   "then the same prompt sampled from each with the same seed.")
    m.add_argument("ids", nargs="+", metavar="ID", help="two or more models, display names or checkpoint folders")
    _data_flags(m)
    _prompt_flags(m)
    _sampling_flags(m, samples=False)
    m.add_argument("--json", action="store_true", help="print the table and samples as one JSON object")
    _device_flags(m)
    m.set_defaults(handler=cmd_compare)

    s = sub.add_parser("serve-model", help="keep a checkpoint loaded and answer JSON commands on stdin (for the TUI)",
                       description="Reads one JSON command per line on stdin (generate, eval, stop, load, quit) and "
                                   "streams events on stdout; see README, 'The process protocol'.")
    _id(s)
    s.add_argument("--events", action="store_true", help="print protocol JSON lines (what the TUI reads) instead of text")
    _device_flags(s)
    s.set_defaults(handler=events_guard(cmd_serve))


def _id(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="ID", help="model name (its newest valid checkpoint), display name "
                                            "(<model>_checkpoint_<step>_run_<k>) or checkpoint folder")


def _data_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_mutually_exclusive_group()
    data.add_argument("--cache", metavar="PATH", help="a packed cache built with the checkpoint's tokenizer")
    data.add_argument("--source", metavar="SPEC", help="any source (file, folder, glob, stdlib, hub dataset), "
                                                      "tokenized in memory with the checkpoint's tokenizer")
    p.add_argument("--batches", type=int, metavar="N", help="batches of the run's micro-batch size to evaluate "
                                                           "(default: the run's eval_batches)")


def _prompt_flags(p: argparse.ArgumentParser) -> None:
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="text to continue (default: start a new document)")
    prompt.add_argument("--prompt-file", metavar="F", type=Path, help="read the prompt from a UTF-8 file")


def _sampling_flags(p: argparse.ArgumentParser, *, samples: bool) -> None:
    d = P.SamplingParams()
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate (default: min(128, context/2))")
    p.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help=f"sampling temperature; 0 is greedy (default {d.temperature})")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="> 1 discourages repeats (default: off)")
    if samples:
        p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples to draw (seeds seed..seed+N-1)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default: a new one, printed with --events)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a sample where this text appears (repeatable; the text is not included)")


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU that has it, else fp32")


def sampling(args: argparse.Namespace) -> P.SamplingParams:
    params = P.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              num_samples=getattr(args, "num_samples", 1), seed=args.seed, stop=list(args.stop))
    problem = params.problem()
    if problem is not None:
        name, rest = problem.split(" ", 1)
        raise UserError(f"--{name.replace('_', '-')} {rest}")
    return params


def prompt_text(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    try:
        raw = args.prompt_file.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read prompt file {args.prompt_file}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {args.prompt_file} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _batches(args: argparse.Namespace) -> int | None:
    if args.batches is not None and args.batches < 1:
        raise UserError(f"--batches must be at least 1, got {args.batches}")
    return args.batches


def _load(layout: Layout, ref: str, args: argparse.Namespace) -> "LoadedModel":
    from engine.inference import load

    return load(layout, ref, device=args.device, precision=args.precision)


def cmd_eval(args: argparse.Namespace) -> int:
    batches = _batches(args)
    layout = Layout.resolve()
    from engine.eval_data import plan, select
    from engine.evaluate import run_eval

    loaded = _load(layout, args.id, args)
    if args.events:
        Output(True)(loaded.loaded_event())
    count, batch_size = plan(loaded, layout, batches)
    data = select(loaded, layout, count, cache=args.cache, source=args.source)
    result = run_eval(loaded, data, layout, batch_size, emit=(lambda e: None) if args.json else Output(args.events))
    if args.json:
        assert result is not None  # only a serve-model stop interrupts an eval
        print(json.dumps(P.to_dict(result), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params, text = sampling(args), prompt_text(args)
    layout = Layout.resolve()
    out = Output(args.events)
    from engine import generate

    loaded = _load(layout, args.id, args)
    if args.events:
        out(loaded.loaded_event())
    generate.run(loaded, generate.encode(loaded, text), params, emit=out)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling(args)
    layout = Layout.resolve()
    from engine import generate
    from engine.chat import Chat

    loaded = _load(layout, args.id, args)
    out = Output(False)
    out(loaded.loaded_event())
    chat = Chat(loaded)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        samples = generate.run(loaded, chat.prompt_ids(line), params, emit=out)
        chat.answered(samples[0].text)


def cmd_compare(args: argparse.Namespace) -> int:
    params, text = sampling(args), prompt_text(args)
    batches = _batches(args)
    if len(args.ids) < 2:
        raise UserError("compare needs at least two checkpoints")
    if params.seed is None:
        params.seed = secrets.randbelow(2**31)  # one seed for every checkpoint
    layout = Layout.resolve()
    from engine.compare import compare, print_comparison

    report = compare(layout, args.ids, params, text, batches=batches, cache=args.cache, source=args.source,
                     load=lambda ref: _load(layout, ref, args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_comparison(report)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    layout = Layout.resolve()
    out = Output(args.events)
    from engine.serve import serve

    loaded = _load(layout, args.id, args)
    out(loaded.loaded_event())
    return serve(layout, loaded, emit=out, commands=sys.stdin, load=lambda ref: _load(layout, ref, args))

