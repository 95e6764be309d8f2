"""`python -m runtime ARTIFACT --prompt "..."`: generate on a device without torch installed."""

from __future__ import annotations

import argparse
import sys

from runtime import ENGINES, open_runtime
from runtime.base import Generator, RuntimeLoadError, Sampling


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="a .gguf file or an exported ONNX folder (model.onnx inside)")
    p.add_argument("--prompt", default=None, help="text to continue (default: 'Once upon a time'); with --chat, one "
                   "user message answered once (default: an interactive session on the terminal)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=None, help="tokens to generate (default: 64; 256 a turn "
                   "with --chat)")
    p.add_argument("--chat", action="store_true", help="talk to the model through its own chat template (from the GGUF "
                   "metadata or the ONNX folder's tokenizer files), stopping at its end-of-turn token")
    p.add_argument("--system", default=None, help="--chat: the system message")
    p.add_argument("--template", default=None, help="--chat: a Jinja chat template file, for a model that carries none "
                   "or to override its own")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: 0; with --chat the model's "
                   "own setting where the artifact carries one)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens, 0 for all (default: 0; "
                   "with --chat the model's own)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, 1 for off (default: 1; with --chat "
                   "the model's own)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's choice)")
    p.add_argument("--engine", default="auto", choices=ENGINES, help="ONNX: onnxruntime-genai's generation loop (genai; "
                   "folders with genai_config.json), our numpy loop over onnxruntime (onnxruntime), or auto: genai where it "
                   "is installed and the folder has its config (default: %(default)s)")
    p.add_argument("--provider", default="auto", help="ONNX: onnxruntime execution provider, auto (CUDA where "
                   "onnxruntime-gpu has it, else CPU), cpu or cuda (default: %(default)s)")


def _sampling(a: argparse.Namespace, defaults: Sampling) -> Sampling:
    """The command line's sampling flags over `defaults` (a flag left out keeps the default)."""
    try:
        return Sampling(defaults.temperature if a.temperature is None else a.temperature,
                        defaults.top_k if a.top_k is None else a.top_k,
                        defaults.top_p if a.top_p is None else a.top_p, a.seed).validate()
    except ValueError as exc:
        raise RuntimeLoadError(str(exc)) from exc


def run(a: argparse.Namespace, out=None, err=None, stdin=None) -> int:
    # Resolved at call time: sys.stdout may be replaced after import (pytest, notebooks).
    out = out or sys.stdout
    err = err or sys.stderr
    if not a.chat and (a.system is not None or a.template is not None):
        raise RuntimeLoadError("--system and --template apply to a chat; add --chat")
    _sampling(a, Sampling())  # bad flags fail before the model loads
    rt = open_runtime(a.artifact, a.threads, a.provider, a.engine)
    if a.chat:
        return chat(a, rt, out, err, stdin or sys.stdin)
    prompt = "Once upon a time" if a.prompt is None else a.prompt
    gen = Generator(rt)
    out.write(prompt)
    for piece in gen.stream(prompt, 64 if a.max_new_tokens is None else a.max_new_tokens, _sampling(a, Sampling())):
        out.write(piece)
        out.flush()
    out.write("\n")
    _stats(rt, gen.stats, err)
    return 0


def _stats(rt, st, err) -> None:
    err.write(f"[{rt.name}] prompt {st.prompt_tokens} tokens at {st.prefill_tok_s:.1f} tok/s, "
              f"generated {st.generated_tokens} tokens at {st.decode_tok_s:.1f} tok/s\n")


def chat(a: argparse.Namespace, rt, out, err, stdin) -> int:
    """--chat: one answer to --prompt, or turns read from `stdin` until end of input ("/exit",
    Ctrl-D or Ctrl-C ends the session cleanly)."""
    from runtime.chat import ChatSession, sampling_defaults, template_for

    template = template_for(a.artifact, rt, a.template)
    defaults, where = sampling_defaults(a.artifact, rt)
    sampling = _sampling(a, defaults)
    flags = [f for f in ("temperature", "top_k", "top_p") if getattr(a, f) is not None]
    err.write(f"[chat] template: {template.source}; sampling: temperature {sampling.temperature:g}, top-k "
              f"{sampling.top_k}, top-p {sampling.top_p:g} ({'flags: ' + ', '.join(flags) + '; else ' if flags else ''}"
              f"{where})\n")
    session = ChatSession(rt, template, sampling, 256 if a.max_new_tokens is None else a.max_new_tokens, a.system)

    def answer(text: str) -> None:
        for piece in session.reply(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        _stats(rt, session.generator.stats, err)

    if a.prompt is not None:
        answer(a.prompt)
        return 0
    interactive = stdin.isatty()
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line or line.strip() == "/exit":  # end of input: the session ends cleanly
            if interactive:
                err.write("\n")
            return 0
        if line.strip():
            try:
                answer(line.rstrip("\n"))
            except KeyboardInterrupt:  # stop this answer, keep the session
                out.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return run(a)
    except RuntimeLoadError as exc:
        print(f"runtime: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
