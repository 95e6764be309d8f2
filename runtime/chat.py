"""Chat with an exported artifact: the model's own chat template, end-of-turn stops, the
model's generation defaults, one-shot or multi-turn (numpy, jinja2: no torch here).

The template comes from where the export put it: a GGUF's `tokenizer.chat_template` metadata,
an ONNX folder's `tokenizer_config.json` (or `chat_template.jinja`), or `--template FILE`.
It is rendered by llama-cpp-python's `Jinja2ChatFormatter`, which keeps transformers'
`apply_chat_template` rules (a sandboxed jinja2 environment with trim_blocks, lstrip_blocks,
loop controls, `raise_exception`), so a GGUF, an ONNX folder and the torch model see the same
prompt string; where llama-cpp-python is not installed (a device that runs ONNX only) the same
jinja2 environment is built here. onnxruntime-genai's `apply_chat_template` is not used: it
renders with its own engine, and the ONNX path must give the GGUF's prompt. The runtime's
tokenizer then reads the special tokens in the prompt as special tokens.

A turn stops at the end-of-text token or at the template's end-of-turn token, found by
rendering a one-message conversation and reading what follows the assistant's text (ChatML's
`<|im_end|>`, LLaMA-3's `<|eot_id|>`, LLaMA-2's `</s>`).

Sampling defaults are the model's where the artifact carries them (a GGUF's
`general.sampling.*` keys, an ONNX folder's `generation_config.json`), else greedy; flags
given on the command line win.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from runtime.base import Generator, Runtime, RuntimeLoadError, Sampling

PROBE = "\u2063probe\u2063"  # an assistant text no template writes itself (invisible separators)


@dataclass
class ChatTemplate:
    text: str
    source: str  # where it was found, for the user
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string of `messages`: llama-cpp-python's Jinja2ChatFormatter where it is
        installed, else the same jinja2 environment built here (an ONNX-only device)."""
        try:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError:
            return self._render_jinja2(messages, add_generation_prompt)
        formatter = Jinja2ChatFormatter(self.text, self.eos_token, self.bos_token, add_generation_prompt)
        try:
            return formatter(messages=messages).prompt
        except Exception as exc:  # noqa: BLE001 - jinja2's TemplateError, raise_exception's ValueError
            raise RuntimeLoadError(f"the chat template ({self.source}) cannot render this conversation: {exc}") from exc

    def _render_jinja2(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise RuntimeLoadError(f"the chat template ({self.source}) cannot render this conversation: {exc}") from exc

    def end_of_turn(self) -> str | None:
        """The text the template writes right after an assistant message (None: nothing)."""
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}], False)
        if PROBE not in text:
            return None
        after = text.split(PROBE, 1)[1].strip()
        return after.split()[0] if after else None

    def end_of_turn_id(self, tokenize) -> int | None:
        """The id of the end-of-turn text when it is one token (`tokenize`: text -> ids, no BOS)."""
        marker = self.end_of_turn()
        ids = tokenize(marker) if marker else []
        return ids[0] if len(ids) == 1 else None


def template_for(artifact: str | Path, runtime: Runtime, template_file: str | Path | None = None) -> ChatTemplate:
    """The chat template of `artifact` (see the module doc); RuntimeLoadError naming --template
    when it has none."""
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise RuntimeLoadError(f"--template {path}: no such file (give a Jinja chat template file)")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        text, source = _stored_template(Path(artifact), runtime)
        if not text:
            raise RuntimeLoadError(f"{artifact} carries no chat template; pass --template FILE (a Jinja chat "
                                   "template, e.g. the model's chat_template.jinja), or drop --chat to continue raw text")
    bos = runtime.detokenize_special(runtime.bos_token_id) if runtime.bos_token_id is not None else ""
    eos_ids = sorted(runtime.eos_token_ids)
    eos = runtime.detokenize_special(eos_ids[0]) if eos_ids else ""
    return ChatTemplate(text, source, bos, eos)


def _stored_template(path: Path, runtime: Runtime) -> tuple[str | None, str]:
    if path.suffix == ".gguf":
        return runtime.metadata().get("tokenizer.chat_template"), f"{path.name}: tokenizer.chat_template"
    folder = path.parent if path.suffix == ".onnx" else path
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja.name)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8-sig"))
        template = data.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template, f"{config.name}: chat_template"
    return None, str(folder)


def sampling_defaults(artifact: str | Path, runtime: Runtime) -> tuple[Sampling, str]:
    """The model's own sampling settings where the artifact carries them, and where from."""
    path = Path(artifact)
    if path.suffix == ".gguf":
        meta = runtime.metadata()
        keys = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k", "top_p": "general.sampling.top_p"}
        found = {k: meta[v] for k, v in keys.items() if v in meta}
        if not found:
            return Sampling(), "greedy: the GGUF carries no general.sampling keys"
        return Sampling(float(found.get("temperature", 1.0)), int(found.get("top_k", 0)), float(found.get("top_p", 1.0))), \
            f"{path.name}: general.sampling.*"
    folder = path.parent if path.suffix == ".onnx" else path
    gen = folder / "generation_config.json"
    if gen.is_file():
        data = json.loads(gen.read_text(encoding="utf-8-sig"))
        if data.get("do_sample"):
            return Sampling(float(data.get("temperature", 1.0)), int(data.get("top_k", 50) or 0),
                            float(data.get("top_p", 1.0))), "generation_config.json"
        return Sampling(), "greedy: generation_config.json has do_sample false"
    return Sampling(), "greedy: no generation_config.json"


@dataclass
class ChatSession:
    """A conversation with `runtime`: each turn renders the whole conversation with the template
    and generates the assistant's answer until an end-of-turn or end-of-text token."""

    runtime: Runtime
    template: ChatTemplate
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 256
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.stop_ids = set(self.runtime.eos_token_ids)
        turn = self.template.end_of_turn_id(lambda text: self.runtime.tokenize(text, add_bos=False))
        if turn is not None:
            self.stop_ids.add(turn)
        self.generator = Generator(self.runtime)

    def prompt_ids(self) -> list[int]:
        text = self.template.render(self.messages, add_generation_prompt=True)
        # the template writes BOS itself where the model wants it (bos_token in the template)
        return self.runtime.tokenize(text, add_bos=False)

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer to `user`; the answer joins the conversation when it is done."""
        self.messages.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        saved = self.runtime.eos_token_ids
        self.runtime.eos_token_ids = self.stop_ids
        try:
            yield from self.generator.stream(ids, self.max_new_tokens, self.sampling)
        finally:
            self.runtime.eos_token_ids = saved
        self.messages.append({"role": "assistant", "content": self.answer_text()})

    def answer_text(self) -> str:
        """The last answer without its stop token."""
        ids = [t for t in self.generator.stats.token_ids if t not in self.stop_ids]
        return self.runtime.detokenize(ids).strip()
