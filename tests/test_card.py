"""The model card (saap_edge/card.py): README.md with Hugging Face metadata in every output
directory, written by compress and updated by export and eval with the numbers they add."""

import json

import yaml

from conftest import save_tiny32


def _metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_compress_export_and_eval_keep_the_card_true_to_the_directory(tmp_path, tiny_tokenizer, data_dir):
    from saap_edge.cli import main

    src = save_tiny32(tmp_path / "m", tiny_tokenizer)
    out = tmp_path / "slim"
    assert main(["compress", "--model", str(src), "--data-dir", str(data_dir), "--ratio", "0.3", "--keep-first", "1",
                 "--calib-samples", "4", "--seq-len", "32", "--recon-samples", "8", "--recover-steps", "2",
                 "--batch-size", "2", "--eval-ppl", "wikitext2", "--eval-limit", "4", "--no-progress",
                 "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    meta = _metadata(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"saap-edge", "pruned", "int4"} <= set(meta["tags"])
    report = json.loads((out / "report.json").read_text())
    assert f"{report['params']['after']:,}" in card and f"{report['params']['removed_share']:.1%}" in card
    recovered = report["ppl"]["wikitext2"]["recovered"]["ppl"]
    assert f"{recovered:,.2f}" in card
    for row in report["per_layer"]:
        assert f"| {row['layer']} | {row['heads_before']} -> {row['heads_after']} | {row['mlp_before']} -> {row['mlp_after']} |" in card
    assert "No device file yet" in card
    assert "# slim\n" in card and "saap-edge export slim --format gguf" in card  # its own name, not the temporary one

    assert main(["export", str(out), "--format", "gguf"]) == 0
    card = (out / "README.md").read_text()
    assert "`model-q4_1.gguf` (llama.cpp)" in card and "gguf" in _metadata(card)["tags"]

    assert main(["eval", str(out), "--ppl", "wikitext2", "--limit", "3", "--data-dir", str(data_dir), "--no-progress"]) == 0
    stored = json.loads((out / "eval.json").read_text())["ppl"]["wikitext2"]
    assert f"wikitext2 perplexity **{stored['ppl']:.2f}** (3 windows" in (out / "README.md").read_text()


def test_an_alias_source_names_its_base_model_and_license(tmp_path):
    from saap_edge.card import card_text

    (tmp_path / "report.json").write_text(json.dumps({"model": {"model": "smollm2-135m", "kind": "alias"}}))
    meta = _metadata(card_text(tmp_path))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
