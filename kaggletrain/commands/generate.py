"""`kaggletrain generate CHECKPOINT --prompt TEXT`: sample text from a checkpoint, streamed as it comes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kaggletrain.cli import app


@app.command("generate")
def generate_cmd(
    checkpoint: Path = typer.Argument(..., help="Official .pth, kaggletrain checkpoint/run directory, or .safetensors."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch of prompts."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", min=0, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(0.85, "--top-p", help="Nucleus sampling mass in (0, 1]; 1 = off."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens; 0 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats; 1 = off."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    state: Optional[Path] = typer.Option(None, "--state", help="Start from a state saved with --save-state."),
    save_state: Optional[Path] = typer.Option(None, "--save-state",
                                              help="Save the state after prompt + output (.safetensors)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
):
    """Generate text. One prompt is streamed to the terminal; several are generated as a batch."""
    import torch

    from kaggletrain.errors import KaggletrainError
    from kaggletrain.infer import TextStream, generate, tokenizer_for
    from kaggletrain.infer.state_io import load_state as read_state_file, save_state as write_state_file
    from kaggletrain.interop import load_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise KaggletrainError(f"--device {device}: expected auto, cpu or cuda (with a GPU present)")
    for option, texts in (("--prompt", prompt), ("--stop", stop or [])):
        for text in texts:
            _check_argv_text(option, text)
    stop = [s for s in (stop or []) if s]
    model, meta = load_checkpoint(checkpoint, device=device)
    model.optimize_for_inference()
    tok = tokenizer_for(meta, model.config.vocab_size)
    ids = [tok.encode(p) for p in prompt]
    init = read_state_file(state, model) if state is not None else None

    streams = [TextStream(tok.decode, stop) for _ in ids]
    live = len(ids) == 1  # one prompt streams; a batch prints each result when done

    def on_tokens(tokens):
        finished = []
        for i, t in enumerate(tokens):
            if t is None:
                continue
            text, stopped = streams[i].push(t)
            if live and text:
                sys.stdout.write(text)
                sys.stdout.flush()
            if stopped:
                finished.append(i)
        return finished

    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, eos_token_id=0 if tok.name == "world" else None,
                   seed=seed, state=init, return_state=save_state is not None, stream=on_tokens)
    for i, s in enumerate(streams):
        rest = s.finish()
        if live:
            sys.stdout.write(rest + "\n")
        else:
            # on_tokens ends a row at its stop string: generate() records that as "callback".
            reason = "stop" if s.stopped and out.finish_reasons[i] == "callback" else out.finish_reasons[i]
            sys.stdout.write(f"--- [{i}] {prompt[i]!r} ({reason})\n{s.text}\n")
    sys.stdout.flush()
    if save_state is not None:
        write_state_file(out.state, save_state)
        typer.echo(f"state saved to {save_state}", err=True)


def _check_argv_text(option: str, text: str) -> None:
    """Python decodes argv with surrogateescape: bytes invalid in the locale's encoding (a latin-1 'é' in a
    UTF-8 terminal) arrive as lone surrogates, which no tokenizer encodes. One line naming the byte instead."""
    from kaggletrain.errors import KaggletrainError

    bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
    if bad is None:
        return
    encoding = sys.getfilesystemencoding()
    try:
        raw, offset = os.fsencode(text), len(os.fsencode(text[:bad]))
        shown, what = repr(raw), f"byte 0x{raw[offset]:02x} at offset {offset}"
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (not from a command line)
        shown, what = ascii(text), f"U+{ord(text[bad]):04X} at character {bad}"
    raise KaggletrainError(f"{option} {shown}: not valid {encoding} text ({what}); give the text in {encoding} "
                           "(is the terminal set to another encoding?)")
