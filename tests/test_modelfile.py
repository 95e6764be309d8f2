"""The Ollama Modelfile beside an exported GGUF (exporters/modelfile.py): its Go template
renders a conversation as the model's Jinja chat template does, its stops and parameters come
from the model."""

import re

import pytest

from conftest import save_tiny32

CONVERSATION = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Who is the master?"},
                {"role": "assistant", "content": "The teacher."}, {"role": "user", "content": "And the boy?"}]


def render_go(template: str, messages: list[dict]) -> str:
    """Go text/template, the subset a Modelfile TEMPLATE written here uses: text, range
    .Messages, if / else if eq .Role "...", end, .Content and quoted string literals, with
    {{- / -}} trimming. (No Python package renders Go templates; this is the test's yardstick.)"""
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template, flags=re.S)
    parts = []  # (kind, value)
    for i, tok in enumerate(tokens):
        if tok.startswith("{{"):
            parts.append(("action", tok[2:-2].strip("-").strip()))
            if tok.startswith("{{-") and parts[-2:-1] and parts[-2][0] == "text":
                parts[-2] = ("text", parts[-2][1].rstrip())
        else:
            if i and tokens[i - 1].endswith("-}}"):
                tok = tok.lstrip()
            parts.append(("text", tok))

    def run(pos, msg, out):
        """Render from parts[pos] until an unmatched else / end; returns that position."""
        while pos < len(parts):
            kind, value = parts[pos]
            if kind == "text":
                out.append(value)
            elif value == ".Content":
                out.append(msg["content"])
            elif value.startswith('"'):
                out.append(value.strip('"'))
            elif value == "range .Messages":
                start = pos + 1
                for m in messages:
                    pos = run(start, m, out)
            elif value.startswith("if "):
                taken = False
                while True:
                    kind, value = parts[pos]
                    cond = re.fullmatch(r'(?:else )?if eq \.Role "(\w+)"', value)
                    if cond and not taken and msg["role"] == cond.group(1):
                        taken = True
                        pos = run(pos + 1, msg, out)
                    else:
                        pos = run(pos + 1, msg, [])  # skip the branch
                    if parts[pos][1] == "end":
                        break
            elif value == "end" or value.startswith("else"):
                return pos
            else:
                raise AssertionError(f"unexpected action {value!r}")
            pos += 1
        return pos

    out = []
    run(0, None, out)
    return "".join(out)


def _modelfile(path):
    text = path.read_text()
    # Ollama's syntax: an instruction a line (multi-line values in triple quotes), comments on lines of their own
    for line in re.sub(r'"""(.*?)"""', '""', text, flags=re.S).splitlines():
        assert not line or line.startswith("#") or re.fullmatch(r'(FROM \S+|TEMPLATE ""|SYSTEM ""|PARAMETER \w+ \S+)', line), line
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    return text, template.group(1) if template else None, system.group(1) if system else None


def test_the_smollm2_template_becomes_a_go_template_that_renders_the_same_prompt():
    from gguf import GGUFReader

    from exporters.modelfile import probe
    from runtime.chat import ChatTemplate
    from saap_edge.models.load import resolve_model

    try:
        kind, path = resolve_model("smollm2-135m")
    except Exception:  # noqa: BLE001
        pytest.skip("the smollm2-135m package is not installed")
    jinja = ChatTemplate(GGUFReader(str(path)).fields["tokenizer.chat_template"].contents(), "smollm2")
    go = probe(jinja)
    assert go is not None and go.default_system.startswith("You are a helpful AI assistant named SmolLM")
    assert render_go(go.text(), CONVERSATION) == jinja.render(CONVERSATION)
    # without a system message the Modelfile's SYSTEM stands in for the one the template adds
    no_system = [{"role": "system", "content": go.default_system}] + CONVERSATION[1:]
    assert render_go(go.text(), no_system) == jinja.render(CONVERSATION[1:])


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}",
    # LLaMA-3's shape: a BOS once, then headers per message
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
])
def test_the_exported_modelfile_renders_a_two_turn_conversation_as_the_tokenizer(tmp_path, tiny_tokenizer, template):
    import copy

    from transformers import AutoTokenizer, GenerationConfig

    from exporters import ExportJob, export

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = template
    src = save_tiny32(tmp_path / "m", tok)
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, bos_token_id=1, eos_token_id=2).save_pretrained(src)
    export(ExportJob(model=str(src), format="gguf", out=src / "model-q4_1.gguf", validate=False))
    text, go, system = _modelfile(src / "Modelfile")
    assert "FROM ./model-q4_1.gguf" in text and system is None
    want = AutoTokenizer.from_pretrained(src).apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_go(go, CONVERSATION) == want
    stop = "</s>" if "<s>" in template else "<|eot_id|>"
    assert f'PARAMETER stop "{stop}"' in text
    assert "PARAMETER temperature 0.7" in text and "PARAMETER top_p 0.9" in text


def test_a_template_that_renders_by_place_leaves_the_template_to_ollama(tmp_path):
    from exporters.modelfile import modelfile_text, probe
    from runtime.chat import ChatTemplate

    # LLaMA-2's shape: the system text inside the first [INST]
    llama2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
              "'\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}"
              "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
              "{{ (sys if loop.first else '') + m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}"
              "{% endif %}{% endfor %}")
    template = ChatTemplate(llama2, "llama2", "<s>", "</s>")
    assert probe(template) is None
    text = modelfile_text("m.gguf", template, ["</s>"], {})
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "Ollama reads the GGUF's own" in text
    (tmp_path / "Modelfile").write_text(text)
    _modelfile(tmp_path / "Modelfile")  # every line parses
    assert "PARAMETER temperature 0\n" in text  # a greedy generation config
