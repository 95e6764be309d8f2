"""Tests of zero-shot multiple-choice evaluation (saap_edge.eval.zeroshot, `eval --tasks`).

Expected log-likelihoods are computed here independently: one plain forward of the same
model over each whole sequence, log-softmax, and a sum over the continuation positions.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, tiny_llama

from saap_edge.cli import main
from saap_edge.errors import UserError
from saap_edge.eval.zeroshot import (
    TASKS,
    Item,
    LlamaCppScorer,
    TorchScorer,
    evaluate_tasks,
    load_task,
    metrics,
    task_names,
)

STORIES = DATA_DIR / "models" / "stories260K" / "stories260K.gguf"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def stories_cpp():
    """llama.cpp on stories260K with an F32 KV cache (so it matches torch float32 closely)."""
    pytest.importorskip("llama_cpp")
    scorer = LlamaCppScorer(STORIES, n_threads=1, type_k=0, type_v=0)
    yield scorer
    scorer.close()
    del scorer
    gc.collect()


def write_jsonl(root: Path, name: str, rows: list[dict]) -> Path:
    path = root / "tasks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def full_forward_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the whole string's tokens after the context's tokens."""
    ctx = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logprobs[pos - 1, ids[pos]]) for pos in range(len(ctx), len(ids)))


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ------------------------------------------------------------- scoring vs a plain forward

QUESTIONS = [
    ("Question: What did the boy throw at the window?", ["a stone", "his hat", "nothing at all", "a café crème"]),
    ("Question: Who was the new teacher of mathematics?", ["Botchan", "the principal"]),
    ("Question: Where did he go on Sunday?", ["to the hot springs", "home", "to Tokyo by the night train"]),
]


def test_choice_task_matches_an_independent_full_forward(tmp_path, model, tiny_tokenizer):
    expected = [[full_forward_loglik(model, tiny_tokenizer, q, " " + c) for c in choices] for q, choices in QUESTIONS]
    golds = [argmax(expected[0]), argmax(expected[1]), (argmax(expected[2]) + 1) % 3]  # two right, one wrong
    rows = [{"query": q, "choices": c, "gold": g} for (q, c), g in zip(QUESTIONS, golds)]
    scorer = TorchScorer(model, tiny_tokenizer, batch_size=4)

    result = evaluate_tasks(scorer, ["arc-e"], write_jsonl(tmp_path, "arc_easy.jsonl", rows), progress=False)

    got = [[scorer.loglikelihood(q, " " + c) for c in choices] for q, choices in QUESTIONS]
    for exp_row, got_row in zip(expected, got):
        assert got_row == pytest.approx(exp_row, abs=1e-4)
    # lm-eval's acc_norm: log-likelihood over the choice's length in characters, the target
    # delimiter (the leading space) not counted
    per_char = [[ll / len(c) for ll, c in zip(lls, q[1])] for lls, q in zip(expected, QUESTIONS)]
    acc_norm = sum(argmax(v) == g for v, g in zip(per_char, golds)) / 3
    r = result["arc_easy"]
    assert r["n"] == 3 and r["acc"] == pytest.approx(2 / 3)
    assert r["acc_norm"] == pytest.approx(acc_norm)
    assert r["acc_stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 2))
    assert result["average"] == {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": 3}


def test_batched_scoring_equals_one_request_at_a_time(model, tiny_tokenizer, data_dir):
    items = load_task("arc_easy", data_dir, limit=4) + load_task("hellaswag", data_dir, limit=2)
    one = TorchScorer(model, tiny_tokenizer, batch_size=1)
    many = TorchScorer(model, tiny_tokenizer, batch_size=5)
    requests = [one.encode_pair(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    assert len({len(r.context) + len(r.continuation) for r in requests}) > 5  # lengths differ: padding is exercised
    expected = one.loglikelihoods(requests)
    assert many.loglikelihoods(requests) == pytest.approx(expected, abs=1e-4)
    many._keeps_logits = False  # a model whose forward has no logits_to_keep: full logits, sliced
    assert many.loglikelihoods(requests) == pytest.approx(expected, abs=1e-4)


def test_long_requests_are_truncated_from_the_left(model, tiny_tokenizer):
    context, continuation = "It was a fine day and the whole school went out to the river.", " Then it rained."
    request = TorchScorer(model, tiny_tokenizer).encode_pair(context, continuation)
    tokens = [*request.context, *request.continuation]
    short = TorchScorer(model, tiny_tokenizer, max_length=8)
    kept = tokens[-9:]  # 8 tokens fed, predicting the last len(continuation) of them
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([kept[:-1]])).logits[0].double(), -1)
    n = len(request.continuation)
    expected = sum(float(logprobs[i, kept[i + 1]]) for i in range(8 - n, 8))
    assert len(tokens) > 9 and short.loglikelihoods([request])[0] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(UserError, match="does not fit"):
        TorchScorer(model, tiny_tokenizer, max_length=n - 1).loglikelihoods([request])


def test_trailing_context_whitespace_moves_to_the_continuation(model, tiny_tokenizer):
    scorer = TorchScorer(model, tiny_tokenizer)
    assert scorer.encode_pair("Question: dresser\n", " a bobby pin") == scorer.encode_pair("Question: dresser", "\n a bobby pin")


# -------------------------------------------------------------------------- acc_norm


def test_acc_norm_divides_by_choice_characters_and_can_flip_the_answer():
    item = Item(("q", "q"), (" ab", " écrue"), gold=1)  # choices of 2 and 5 characters (delimiter space not counted)
    r = metrics([item], [[-4.0, -6.0]])
    assert r["acc"] == 0.0  # -4 > -6
    assert r["acc_norm"] == 1.0  # -4/2 = -2 < -6/5 = -1.2
    assert r["acc_stderr"] is None and r["n"] == 1
    # characters, not UTF-8 bytes: " éé" is 2 characters (4 bytes), " abc" 3 characters (3 bytes).
    # Per character -2.9/2 = -1.45 < -4/3 = -1.33 picks choice 1; per byte (-0.73 > -1.33) it would pick 0.
    item = Item(("q", "q"), (" éé", " abc"), gold=1)
    assert metrics([item], [[-2.9, -4.0]])["acc_norm"] == 1.0


def test_ties_go_to_the_first_choice():
    r = metrics([Item(("q",) * 3, (" a", " b", " c"), gold=0)], [[-1.0, -1.0, -1.0]])
    assert r["acc"] == r["acc_norm"] == 1.0


# ------------------------------------------------------------------------ task formats


def test_winogrande_scores_the_continuation_after_each_option(tmp_path, model, tiny_tokenizer):
    rows = [
        {"context_options": ["The trophy did not fit in the case because the trophy",
                             "The trophy did not fit in the case because the case"],
         "continuation": "was too big.", "gold": 0},
        {"context_options": ["Botchan liked the teacher more than the principal because the teacher",
                             "Botchan liked the teacher more than the principal because the principal"],
         "continuation": "was honest.", "gold": 1},
    ]
    expected = [[full_forward_loglik(model, tiny_tokenizer, o, " " + r["continuation"]) for o in r["context_options"]]
                for r in rows]
    items = load_task("winogrande", write_jsonl(tmp_path, "winogrande.jsonl", rows))
    assert items[0].contexts == tuple(rows[0]["context_options"])
    assert items[0].continuations == (" was too big.", " was too big.")
    scorer = TorchScorer(model, tiny_tokenizer, batch_size=3)
    result = evaluate_tasks(scorer, ["winogrande"], tmp_path, progress=False)["winogrande"]
    hits = [argmax(e) == r["gold"] for e, r in zip(expected, rows)]
    assert result["acc"] == result["acc_norm"] == sum(hits) / 2  # same continuation: normalising changes nothing
    got = [[scorer.loglikelihood(c, x) for c, x in zip(i.contexts, i.continuations)] for i in items]
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, abs=1e-4)


def test_hellaswag_six_line_format(tmp_path):
    text = ("Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap.\nis ripping tiles.\n"
            "is holding a cube.\nstarts pulling up roofing.\nBaking: She opens the oven. she\n0\ntakes out "
            "a cake.\nsings.\nflies away.\nreads a map.\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_val.txt").write_text(text, encoding="utf-8")
    items = load_task("hellaswag", tmp_path)
    assert [i.gold for i in items] == [3, 0]
    assert items[1].contexts == ("Baking: She opens the oven. she",) * 4
    assert items[0].continuations == (" is using wrap.", " is ripping tiles.", " is holding a cube.",
                                      " starts pulling up roofing.")
    (tmp_path / "tasks" / "hellaswag_val.txt").write_text(text + "one more line\n", encoding="utf-8")
    with pytest.raises(UserError, match="not a multiple of 6"):
        load_task("hellaswag", tmp_path)


def test_local_task_files_have_their_documented_sizes(data_dir):
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "winogrande": 1267}
    for name, size in sizes.items():
        items = load_task(name, data_dir)
        assert len(items) == size and all(0 <= i.gold < len(i.continuations) for i in items)
    assert len(load_task("hellaswag", data_dir, limit=10042)) == 10042


def test_hub_rows_become_the_same_items(tmp_path, monkeypatch):
    import datasets

    rows = {
        "allenai/ai2_arc": [{"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                             "answerKey": "B"}],
        "allenai/winogrande": [{"sentence": "Anna gave Beth a book because _ was done with it.", "option1": "Anna",
                                "option2": "Beth", "answer": "1"}],
    }
    calls = []

    def fake(*args, split):
        calls.append((args, split))
        return rows[args[0]]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    arc = load_task("arc-c", tmp_path)[0]
    assert arc == Item(("Question: Which is a gas?",) * 2, (" ice", " steam"), 1)
    wino = load_task("winogrande", tmp_path)[0]
    assert wino == Item(("Anna gave Beth a book because Anna", "Anna gave Beth a book because Beth"),
                        (" was done with it.",) * 2, 0)
    assert calls == [(("allenai/ai2_arc", "ARC-Challenge"), "test"), (("allenai/winogrande", "winogrande_xl"), "validation")]


# ------------------------------------------------------------------ llama.cpp scorer


def test_llama_cpp_matches_the_torch_reader_on_stories260k(stories_cpp):
    from exporters.gguf import read_gguf

    reader, _ = read_gguf(STORIES)
    pairs = [("Once upon a time, there was a little girl named", " Lily."),
             ("Lily wanted to play with her", " friends in the park."),
             ("Lily wanted to play with her", " ball."),
             ("The sun was", " shining bright in the sky.")]
    requests = [stories_cpp.encode_pair(c, x) for c, x in pairs]
    assert requests[0].context[0] == 1  # llama.cpp prepends BOS for this SentencePiece model
    torch_lls = TorchScorer(reader, batch_size=3).loglikelihoods(requests)
    cpp_lls = stories_cpp.loglikelihoods(requests)
    assert cpp_lls == pytest.approx(torch_lls, abs=1e-3)
    # the KV cache kept for a shared prefix changes nothing: the same requests in reverse order
    assert stories_cpp.loglikelihoods(requests[::-1])[::-1] == pytest.approx(cpp_lls, abs=1e-4)


def test_a_trained_model_gets_obvious_items_right(tmp_path, stories_cpp):
    rows = [
        {"query": "Once upon a time, there was a little girl named", "choices": ["Lily.", "purple engine oxygen."], "gold": 0},
        {"query": "Lily wanted to play with her", "choices": ["quantum tax returns.", "friends."], "gold": 1},
        {"query": "The sun was", "choices": ["shining bright in the sky.", "algorithmically deprecated."], "gold": 0},
    ]
    result = evaluate_tasks(stories_cpp, ["arc_easy"], write_jsonl(tmp_path, "arc_easy.jsonl", rows), progress=False)
    assert result["arc_easy"]["acc"] == result["arc_easy"]["acc_norm"] == 1.0


# -------------------------------------------------------------------------- bad input


def test_task_names_resolve_aliases_and_all():
    assert task_names(["arc-e", "obqa", "openbook_qa", "ARC_EASY"]) == ["arc_easy", "openbookqa"]
    assert task_names(["all"]) == list(TASKS) and len(TASKS) == 7
    with pytest.raises(UserError) as err:
        task_names(["nope"])
    assert "'nope'" in str(err.value) and all(name in str(err.value) for name in TASKS)


def test_missing_task_file_names_the_file_and_the_fix(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_task("piqa", tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "tasks" / "piqa.jsonl") in message
    assert "--data-dir" in message and "hub unreachable" in message


def test_limit_beyond_the_task_is_an_error(data_dir):
    with pytest.raises(UserError, match="--limit 501 exceeds the 500 items of task openbookqa"):
        load_task("obqa", data_dir, limit=501)
    with pytest.raises(UserError, match=">= 1"):
        load_task("obqa", data_dir, limit=0)
    assert len(load_task("obqa", data_dir, limit=500)) == 500


def test_malformed_rows_name_their_line(tmp_path):
    write_jsonl(tmp_path, "boolq.jsonl", [{"query": "q", "choices": ["no", "yes"], "gold": 1},
                                          {"query": "q", "choices": ["no", "yes"], "gold": 2}])
    with pytest.raises(UserError, match="boolq.jsonl line 2: gold 2"):
        load_task("boolq", tmp_path)


# ---------------------------------------------------------------------------- the CLI


def test_cli_unknown_task_exits_2_with_one_line(tiny_model_dir, data_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--tasks", "nope", "--data-dir", str(data_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saap-edge eval: error: unknown task 'nope'"), lines


def test_cli_needs_ppl_or_tasks(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--ppl" in lines[0] and "--tasks" in lines[0]


def test_cli_ppl_and_tasks_together(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_model_dir), "--ppl", "wikitext2", "--tasks", "arc-e", "winogrande", "--limit", "2",
            "--json", str(out), "--data-dir", str(data_dir), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert set(data) == {"model", "split", "ppl", "tasks", "limit", "scorer"}
    assert data["limit"] == 2 and data["ppl"]["wikitext2"]["windows"] == 2 and data["scorer"] == "torch"
    assert list(data["tasks"]) == ["arc_easy", "winogrande", "average"]
    assert all(0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 for r in data["tasks"].values())
    assert data["tasks"]["arc_easy"]["n"] == 2 and data["tasks"]["average"]["n"] == 4
    printed = capsys.readouterr().out
    assert "| task" in printed and "average" in printed and "perplexity" in printed
    assert not out.with_name(out.name + ".tmp").exists()


def test_cli_scores_a_gguf_file_with_llama_cpp(data_dir, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "eval.json"
    argv = ["eval", str(STORIES), "--tasks", "piqa", "--limit", "3", "--json", str(out), "--data-dir", str(data_dir),
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["scorer"] == "llama.cpp" and data["model"]["path"] == str(STORIES)
    assert data["tasks"]["piqa"]["n"] == 3 and "ppl" not in data


def test_acc_norm_divides_by_the_choice_length_without_the_delimiter_space():
    """lm-eval's rule, on numbers where the rules disagree: " a" scores -1.0 over 1 character
    (-1.0 a character) and " bbb" -2.9 over 3 (-0.967): the second wins. Counting the leading
    space (-0.5 against -0.725) or bytes would pick the first."""
    from saap_edge.eval.zeroshot import Item, metrics

    item = Item(("q", "q"), (" a", " bbb"), gold=1)
    r = metrics([item], [[-1.0, -2.9]])
    assert r["acc"] == 0 and r["acc_norm"] == 1
