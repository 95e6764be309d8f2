"""Chat through an exported artifact (runtime/chat.py, `saap-edge run --chat`): the model's own
template from the GGUF metadata or the ONNX folder, the same tokens as transformers'
apply_chat_template + greedy generate, stops at the end-of-turn token, clean exits."""

import io
import json

import pytest
import torch

from conftest import save_tiny32

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Who is the master?"},
                {"role": "assistant", "content": "The teacher."}, {"role": "user", "content": "And the boy?"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_tokenizer):
    """A tiny LLaMA whose tokenizer has a chat template (</s> ends a turn), exported as an F32
    GGUF and a float32 ONNX folder (so greedy tokens match torch's)."""
    import copy

    from exporters import ExportJob, export

    root = tmp_path_factory.mktemp("chat")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    src = save_tiny32(root / "m", tok)
    gguf = export(ExportJob(model=str(src), format="gguf", quant="f32", embed_type="f32", out=root / "m.gguf")).path
    onnx = export(ExportJob(model=str(src), format="onnx", quant="f32", embed_type="f32", out=root / "onnx")).path
    return src, gguf, onnx


def _torch_answer(src, messages, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return ids, out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_a_chat_turn_gives_transformers_tokens(chat_model, kind):
    from runtime import open_runtime
    from runtime.chat import ChatSession, template_for

    src, gguf, onnx = chat_model
    path = gguf if kind == "gguf" else onnx
    rt = open_runtime(str(path), engine="onnxruntime" if kind == "onnx" else "auto")
    template = template_for(path, rt)
    session = ChatSession(rt, template, max_new_tokens=12, system=CONVERSATION[0]["content"])
    session.messages += CONVERSATION[1:3]
    want_prompt, want = _torch_answer(src, CONVERSATION, 12)
    session.messages.append(CONVERSATION[3])
    assert session.prompt_ids() == want_prompt  # the conversation, rendered and tokenized alike
    session.messages.pop()
    "".join(session.reply(CONVERSATION[3]["content"]))
    assert session.generator.stats.token_ids == want
    assert session.messages[-1]["role"] == "assistant"


def test_the_template_renders_as_transformers_renders_it(chat_model):
    from transformers import AutoTokenizer

    from runtime import open_runtime
    from runtime.chat import template_for

    src, gguf, onnx = chat_model
    want = AutoTokenizer.from_pretrained(src).apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    for path in (gguf, onnx):
        template = template_for(path, open_runtime(str(path), engine="onnxruntime"))
        assert template.render(CONVERSATION) == want
        assert template.end_of_turn() == "</s>"


def test_an_answer_stops_at_the_end_of_turn_token(chat_model):
    """A turn ends at the template's end-of-turn token, here forced by giving the runtime's
    end-of-text id nothing to match: the stop comes from the template alone."""
    import numpy as np

    from runtime import open_runtime
    from runtime.chat import ChatSession, template_for

    _, gguf, _ = chat_model
    rt = open_runtime(str(gguf))
    rt.eos_token_ids = set()
    end = rt.tokenize("</s>", add_bos=False)[0]
    forced = rt.logits

    def logits(ids):  # the third token of every answer is the end of turn
        out = forced(ids)
        if len(session.generator.stats.token_ids) == 2:
            out = np.full_like(out, -1e9)
            out[end] = 0
        return out

    rt.logits = logits
    session = ChatSession(rt, template_for(gguf, rt), max_new_tokens=40)
    "".join(session.reply("hello"))
    assert session.generator.stats.token_ids[-1] == end and len(session.generator.stats.token_ids) == 3


def test_run_chat_answers_once_and_says_which_template_and_sampling(chat_model, capsys):
    from saap_edge.cli import main

    _, gguf, _ = chat_model
    assert main(["run", str(gguf), "--chat", "--prompt", "Who is the master?", "-n", "6"]) == 0
    err = capsys.readouterr().err
    assert "template: m.gguf: tokenizer.chat_template" in err
    assert "sampling: temperature 0, top-k 0, top-p 1 (greedy" in err


def test_an_interactive_session_ends_cleanly_at_end_of_input(chat_model):
    import argparse

    from runtime.__main__ import add_arguments, run

    _, gguf, _ = chat_model
    p = argparse.ArgumentParser()
    add_arguments(p)
    out, err = io.StringIO(), io.StringIO()
    a = p.parse_args([str(gguf), "--chat", "-n", "4"])
    assert run(a, out, err, io.StringIO("first question\n\nsecond question\n")) == 0
    assert err.getvalue().count("generated") == 2  # two turns, the empty line skipped, then EOF: exit 0


def test_chat_without_a_template_names_the_template_flag(chat_model, tmp_path, tiny_tokenizer, capsys):
    from exporters import ExportJob, export
    from saap_edge.cli import main

    src = save_tiny32(tmp_path / "plain", tiny_tokenizer)
    gguf = export(ExportJob(model=str(src), format="gguf", quant="f32", embed_type="f32", out=tmp_path / "p.gguf",
                            validate=False)).path
    assert main(["run", str(gguf), "--chat", "--prompt", "hi"]) == 2
    assert "--template FILE" in capsys.readouterr().err
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert main(["run", str(gguf), "--chat", "--prompt", "hi", "-n", "3", "--template", str(tmp_path / "t.jinja")]) == 0


def test_the_models_sampling_defaults_travel_in_the_gguf(tmp_path, tiny_tokenizer, capsys):
    from transformers import GenerationConfig

    from exporters import ExportJob, export
    from saap_edge.cli import main

    src = save_tiny32(tmp_path / "m", tiny_tokenizer)
    GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, bos_token_id=1, eos_token_id=2).save_pretrained(src)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    gguf = export(ExportJob(model=str(src), format="gguf", out=tmp_path / "m.gguf")).path
    assert main(["run", str(gguf), "--chat", "--prompt", "hi", "-n", "3", "--template", str(tmp_path / "t.jinja"),
                 "--top-k", "5"]) == 0
    err = capsys.readouterr().err
    assert "temperature 0.6, top-k 5, top-p 0.9 (flags: top_k; else m.gguf: general.sampling.*)" in err
    assert json.loads((src / "generation_config.json").read_text())["top_k"] == 20


def test_compare_writes_answers_side_by_side(chat_model, tmp_path, capsys):
    from saap_edge.cli import main

    _, gguf, onnx = chat_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who is the master?\n\nWhere is the school?\n")
    out = tmp_path / "compare.md"
    assert main(["compare", str(gguf), str(onnx), "--prompts", str(prompts), "-n", "5", "--out", str(out),
                 "--no-progress"]) == 0
    text = out.read_text()
    assert "## 1. Who is the master?" in text and "## 2. Where is the school?" in text
    assert text.count("| m.gguf |") + text.count("| onnx |") >= 2  # each model, per prompt
    table = [line for line in text.splitlines() if line.startswith("| ") and "chat_template" in line]
    assert len(table) == 2  # one summary row a model, with the template it used
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["compare", str(gguf), "--prompts", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_compare_greedy_answers_are_the_chat_answers(chat_model, tmp_path):
    from runtime import open_runtime
    from runtime.chat import ChatSession, template_for
    from saap_edge.compare import compare

    _, gguf, _ = chat_model
    models, _ = compare([str(gguf)], ["Who is the master?"], max_new_tokens=6, progress=False)
    rt = open_runtime(str(gguf))
    session = ChatSession(rt, template_for(gguf, rt), max_new_tokens=6)
    assert models[0].answers[0].text == "".join(session.reply("Who is the master?")).strip()


def test_genai_config_carries_the_end_of_turn_id_and_the_sampling_defaults(tmp_path, tiny_tokenizer):
    """An ONNX folder's genai_config.json stops onnxruntime-genai at the template's end-of-turn
    token (here <s>, not the end-of-text </s>) and samples as the generation config says."""
    import copy

    from transformers import GenerationConfig

    from exporters import ExportJob, export

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<s>\n{% endfor %}"
    src = save_tiny32(tmp_path / "m", tok)
    GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, bos_token_id=1, eos_token_id=2).save_pretrained(src)
    folder = export(ExportJob(model=str(src), format="onnx", out=tmp_path / "onnx", validate=False)).path
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["eos_token_id"] == [2, 1]
    assert genai["search"]["do_sample"] and genai["search"]["temperature"] == 0.6 and genai["search"]["top_k"] == 20


def test_without_llama_cpp_the_template_renders_the_same(chat_model, monkeypatch):
    """An ONNX-only device (no llama-cpp-python) renders with the jinja2 environment built in
    runtime/chat.py: the same string as transformers."""
    import builtins

    from transformers import AutoTokenizer

    from runtime.chat import ChatTemplate

    src, _, _ = chat_model
    real = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name.startswith("llama_cpp"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    tok = AutoTokenizer.from_pretrained(src)
    template = ChatTemplate(tok.chat_template, "test", "<s>", "</s>")
    want = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert template.render(CONVERSATION) == want
    with pytest.raises(ImportError):
        import llama_cpp.llama_chat_format  # noqa: F401  (the fallback was what ran)
