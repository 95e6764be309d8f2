"""lm-eval parity: lm-eval's `hf` model on our task configs gives our acc / acc_norm on the same items."""

from __future__ import annotations

import pytest
import torch

from conftest import hetero_model, save_tiny32
from saap_edge.outputs import save_model
from saap_edge.eval.zeroshot import TASKS, TorchScorer, load_tasks, score_tasks

pytest.importorskip("lm_eval")
LIMIT = 6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("lmeval")
    slim = root / "slim"
    save_model(slim, hetero_model(vocab=512), tiny_tokenizer)  # a pruned layout: per-layer heads and widths
    return {"dense": save_tiny32(root / "dense", tiny_tokenizer), "slim": slim}


@pytest.mark.parametrize("kind", ["dense", "slim"])
def test_lm_eval_scores_our_items_as_we_do(kind, model_dirs, tiny_tokenizer, data_dir, tmp_path):
    from saap_edge.eval.lmeval import evaluate_lm_eval
    from saap_edge.models.load import load_model

    theirs = evaluate_lm_eval(model_dirs[kind], list(TASKS), data_dir, tmp_path / "configs", LIMIT, batch_size=4,
                              samples=True)
    loaded = load_model(str(model_dirs[kind]), "cpu", "float32")
    scorer = TorchScorer(loaded.model, loaded.tokenizer, batch_size=4)
    tasks = load_tasks(list(TASKS), data_dir, LIMIT)
    mine = score_tasks(scorer, tasks, progress=False)
    for task, items in tasks.items():
        lls = scorer.loglikelihoods([scorer.encode_pair(c, x) for it in items for c, x in zip(it.contexts, it.continuations)])
        flat = [v for item in theirs[task]["loglikelihoods"] for v in item]
        torch.testing.assert_close(torch.tensor(flat), torch.tensor(lls, dtype=torch.float64).float(), rtol=1e-4, atol=1e-3)
        assert theirs[task]["n"] == mine[task]["n"] == LIMIT
        assert theirs[task]["acc"] == mine[task]["acc"], task
        if task != "winogrande":
            assert theirs[task]["acc_norm"] == mine[task]["acc_norm"], task
        assert theirs[task]["acc_stderr"] == pytest.approx(mine[task]["acc_stderr"])


def test_eval_cli_scores_with_lm_eval_and_writes_its_configs(model_dirs, data_dir, tmp_path, capsys):
    import json

    from saap_edge.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", str(model_dirs["slim"]), "--tasks", "arc-e", "winogrande", "--limit", "3", "--scorer", "lm-eval",
                 "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scorer"] == "lm-eval" and result["tasks"]["arc_easy"]["n"] == 3 and "acc_norm" not in result["tasks"]["winogrande"]
    configs = tmp_path / "configs"
    assert main(["eval", str(model_dirs["slim"]), "--tasks", "boolq", "--limit", "2", "--lm-eval-configs", str(configs),
                 "--data-dir", str(data_dir), "--device", "cpu", "--no-progress"]) == 0
    assert "lm_eval --model hf --model_args pretrained=" in capsys.readouterr().out
    rows = [json.loads(line) for line in (configs / "saap_boolq.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"query", "choices", "gold"} and (configs / "saap_boolq.yaml").exists()
    gguf = data_dir / "models" / "stories260K" / "stories260K.gguf"
    assert main(["eval", str(gguf), "--tasks", "boolq", "--scorer", "lm-eval", "--data-dir", str(data_dir)]) == 2
    assert "needs a model directory" not in (err := capsys.readouterr().err) and "is not one" in err
