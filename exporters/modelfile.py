"""An Ollama Modelfile beside an exported GGUF: FROM the file, the chat template as Ollama's Go
template, the stop tokens and the sampling parameters of the model's generation config.

Ollama's TEMPLATE is a Go text/template over `.Messages`; the model's is Jinja. No library
translates one into the other, so the template is probed (written here): the Jinja template is
rendered for a conversation growing one message at a time, each message's text is what its
rendering adds, and that text split around the message's content gives the role's prefix and
suffix. Where every system, user and assistant message renders as prefix + content + suffix
whatever its place (ChatML, LLaMA-3, Zephyr...), the Go template repeats those pieces; a default
system message the template adds on its own becomes the Modelfile's SYSTEM. A template that
renders a message by its place (LLaMA-2's system text inside the first [INST]) gets no TEMPLATE
line: Ollama then reads the GGUF's own `tokenizer.chat_template` (the Modelfile says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.chat import ChatTemplate

MODELFILE = "Modelfile"
ROLES = ("system", "user", "assistant")
SENTINEL = "\u2063{}\u2063"  # message contents no template writes itself


@dataclass
class GoTemplate:
    header: str  # before the first message (a BOS the template writes once)
    pieces: dict[str, tuple[str, str]]  # role -> (prefix, suffix) around the content
    generation: str  # after the last message, before the answer
    default_system: str | None  # what the template says when no system message is given

    def text(self) -> str:
        branches = []
        for i, role in enumerate(ROLES):
            pre, post = self.pieces[role]
            branches.append(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}'
                            + f"{_literal(pre)}{{{{ .Content }}}}{_literal(post)}")
        # no "{{-": it would trim the newline a piece ends with
        return _literal(self.header) + "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + _literal(self.generation)


def _literal(text: str) -> str:
    """Text as a Go template writes it: as is, except "{{", which would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def _split(segment: str, content: str) -> tuple[str, str] | None:
    if segment.count(content) != 1:
        return None
    pre, post = segment.split(content)
    return pre, post


def probe(template: ChatTemplate) -> GoTemplate | None:
    """The Go pieces of `template` (see the module doc), or None where it renders a message by
    its place in the conversation."""
    from runtime.base import RuntimeLoadError

    conversation = [{"role": r, "content": SENTINEL.format(f"{r}{i}")}
                    for i, r in enumerate(("system", "user", "assistant", "user", "assistant", "user"))]
    try:
        renders = [template.render(conversation[:k], add_generation_prompt=False) for k in range(1, 7)]
        with_prompt = template.render(conversation, add_generation_prompt=True)
        no_system = template.render(conversation[1:2], add_generation_prompt=False)
    except RuntimeLoadError:
        return None
    pieces: dict[str, tuple[str, str]] = {}
    for k in range(1, 6):  # each later message: what its rendering adds, around its content
        before, after = renders[k - 1], renders[k]
        split = _split(after[len(before):], conversation[k]["content"]) if after.startswith(before) else None
        if split is None or pieces.setdefault(conversation[k]["role"], split) != split:
            return None  # this role renders differently at another place
    if not with_prompt.startswith(renders[-1]):
        return None
    user = "".join((pieces["user"][0], conversation[1]["content"], pieces["user"][1]))
    system = _split(renders[0], conversation[0]["content"])
    if system is None or not no_system.endswith(user):
        return None
    lead, post = system  # header + system prefix, then the system suffix
    before_user = no_system[: len(no_system) - len(user)]
    default_system = None
    if before_user.startswith(lead) and before_user.endswith(post) and len(before_user) >= len(lead) + len(post):
        # the template writes a system message of its own when none is given: it becomes the
        # Modelfile's SYSTEM, so every conversation has one and the header stays in its prefix
        default_system, header = before_user[len(lead): len(before_user) - len(post)], ""
    elif lead.startswith(before_user):
        header = before_user  # what the template writes once before any message (a BOS)
    else:
        return None
    pieces["system"] = (lead[len(header):], post)
    return GoTemplate(header, pieces, with_prompt[len(renders[-1]):], default_system)


def modelfile_text(gguf_name: str, template: ChatTemplate | None, stops: list[str], generation: dict | None) -> str:
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    go = probe(template) if template is not None else None
    if go is not None:
        lines.append(f'TEMPLATE """{go.text()}"""')
        if go.default_system is not None:
            lines.append(f'SYSTEM """{go.default_system}"""')
    elif template is not None:
        lines.append("# no TEMPLATE: this chat template renders messages by their place; Ollama reads the GGUF's own")
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    gen = generation or {}
    if gen.get("do_sample"):
        for key, name in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p")):
            if gen.get(key) is not None:
                lines.append(f"PARAMETER {name} {gen[key]}")
    else:
        lines += ["# the model's generation config decodes greedily", "PARAMETER temperature 0"]
    if gen.get("repetition_penalty") not in (None, 1.0):
        lines.append(f"PARAMETER repeat_penalty {gen['repetition_penalty']}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, generation: dict | None = None) -> Path:
    """Modelfile beside `gguf`, from the file's own chat template and special tokens."""
    from saap_edge.outputs import write_file
    from saap_edge.models.gguf_index import GGUFIndex

    index = GGUFIndex(gguf)  # metadata only (gguf-py's reader takes seconds over a 128k-token vocabulary)
    tokens = index.get("tokenizer.ggml.tokens") or []
    eos = index.get("tokenizer.ggml.eos_token_id")
    bos = index.get("tokenizer.ggml.bos_token_id")
    text = index.get("tokenizer.chat_template")
    eos_text = tokens[eos] if eos is not None and eos < len(tokens) else ""
    template = ChatTemplate(text, f"{gguf.name}: tokenizer.chat_template", tokens[bos] if bos is not None and
                            bos < len(tokens) else "", eos_text) if text else None
    stops = []
    marker = template.end_of_turn() if template is not None else None
    for s in (marker, eos_text):
        if s and s not in stops:
            stops.append(s)
    path = gguf.parent / MODELFILE
    write_file(path, modelfile_text(gguf.name, template, stops, generation))
    return path
