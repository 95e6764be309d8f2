"""The model card: `README.md` in every saap-edge output directory.

Hugging Face's model-card metadata block first (base_model, library_name, pipeline_tag, tags,
license where the source's is known), then what was done (method, ratio, units removed per
layer, reconstruction, recovery, the int4 format), the numbers of `report.json` and of later
`saap-edge eval` runs (`eval.json`) with their protocol, how to load each file the directory
holds, and the limits measured. Written from the files in the directory alone, so compress
and recover write it and export and eval write it again when they add a file or a number.
"""

from __future__ import annotations

import json
from pathlib import Path

from saap_edge.run_report import RunReport
from saap_edge.outputs import CHART_FILE, PLAN_FILE, REPORT_FILE, write_file

CARD_FILE = "README.md"
EVAL_FILE = "eval.json"  # results of `saap-edge eval DIR`, merged run after run
# what is known of the built-in aliases' sources (their own model cards)
ALIAS_SOURCES = {"smollm2-135m": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _source(report: RunReport) -> dict:
    """base_model / license of the model the directory was made from, where known."""
    model = report.model or {}
    name, kind = str(model.get("model", "")), model.get("kind")
    if name in ALIAS_SOURCES:
        return dict(ALIAS_SOURCES[name])
    out = {}
    if kind == "hf" and not Path(name).exists() and name.count("/") == 1:
        out["base_model"] = name  # a hub id
    path = Path(model.get("path") or name)
    readme = path / "README.md" if path.is_dir() else None
    if readme and readme.is_file():  # the source's own card: the license line of its metadata block
        text = readme.read_text(encoding="utf-8", errors="ignore")
        head = text.split("---")[1] if text.startswith("---") and text.count("---") >= 2 else ""
        for line in head.splitlines():
            if line.startswith("license:"):
                out["license"] = line.split(":", 1)[1].strip()
    return out


def _yaml(meta: dict) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---"])


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _artifacts(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.gguf"), *(p for p in directory.glob("onnx-*") if (p / "model.onnx").is_file())])


def card_text(directory: Path, name: str | None = None) -> str:
    """The card of `directory`; `name`: the directory's name where it is being written under a
    temporary one."""
    directory = Path(directory)
    dir_name = name or directory.name
    report = RunReport.from_dict(_read(directory / REPORT_FILE))
    plan = _read(directory / PLAN_FILE)
    config = _read(directory / "config.json")
    evals = _read(directory / EVAL_FILE)
    settings = report.settings
    method, ratio = settings.get("method", plan.get("method", "?")), settings.get("ratio", plan.get("ratio"))
    recovery = report.recovery or {}
    quant = config.get("quantization") or {}
    artifacts = _artifacts(directory)
    source = _source(report)
    tags = ["saap-edge", "pruned", "structured-pruning", "llama"] + (["int4"] if quant else [])
    tags += sorted({"gguf" for a in artifacts if a.suffix == ".gguf"} | {"onnx" for a in artifacts if a.suffix != ".gguf"})
    meta = {**({"base_model": source["base_model"]} if "base_model" in source else {}),
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags,
            **({"license": source["license"]} if "license" in source else {})}
    base = source.get("base_model") or report.model.get("model", "the source model")
    params = report.params
    out = [_yaml(meta), "", f"# {dir_name}", ""]
    share = params.get("removed_share")
    out.append(f"{base} with {share:.1%} of its parameters removed by structured pruning ({method}"
               f"{', asked ' + format(ratio, '.0%') if isinstance(ratio, (int, float)) else ''})"
               + (", its projections stored as int4 groups" if quant else "") + ", made with saap-edge."
               if isinstance(share, float) else f"{base}, compressed by saap-edge ({method}).")
    out += ["", "## What was done", ""]
    if params:
        out.append(f"- **Pruning**: {method}; parameters {_fmt(params.get('before'))} -> {_fmt(params.get('after'))}.")
    recon = report.reconstruction or {}
    if recon.get("method", "none") != "none":
        out.append(f"- **Reconstruction**: the kept weights refit by {recon['method']} on {recon.get('samples')} windows of "
                   f"{recon.get('seq_len')} tokens (target {recon.get('target')}).")
    if recovery:
        rs = recovery.get("settings", {})
        data = recovery.get("data", {})
        out.append(f"- **Recovery**: {recovery.get('recovery')} ({rs.get('order', 'quantize-distil')}), loss {rs.get('loss')}, "
                   f"trained {', '.join(recovery.get('trained') or []) or '-'}, {recovery.get('steps')} steps "
                   f"({_fmt(recovery.get('tokens_trained'))} tokens of {data.get('source', rs.get('data'))}).")
    if quant:
        out.append(f"- **int4 format**: the q/k/v/o/gate/up/down projections as groups of {quant.get('group_size')} "
                   "weights, w = a * q + b with 4-bit codes q and fp16 scale a and offset b per group; the GGUF (Q4_1 "
                   "blocks) and ONNX (MatMulNBits) exports hold these numbers bit for bit.")
    layers = report.per_layer or []
    if layers:
        out += ["", "Units kept per layer (query heads, MLP width):", "", "| layer | heads | MLP width |", "|---|---|---|"]
        for row in layers:
            out.append(f"| {row['layer']} | {row['heads_before']} -> {row['heads_after']} | "
                       f"{row['mlp_before']} -> {row['mlp_after']} |")
        if (directory / CHART_FILE).is_file():
            out += ["", f"![units kept per layer]({CHART_FILE})"]
    out += ["", "## Measured", ""]
    ppl = report.ppl
    if ppl:
        out += ["Perplexity measured by `compress` (first windows of each test set; lower is better):", "",
                "| test set | windows x tokens | dense | pruned | recovered |", "|---|---|---|---|---|"]
        for name, r in ppl.items():
            after = r.get("after") or {}
            out.append(f"| {name} | {after.get('windows')} x {after.get('window')} | "
                       f"{_fmt((r.get('before') or {}).get('ppl'))} | {_fmt(after.get('ppl'))} | "
                       f"{_fmt((r.get('recovered') or {}).get('ppl'))} |")
    if evals:
        out.append("")
    for name, r in (evals.get("ppl") or {}).items():
        out.append(f"- `saap-edge eval`: {name} perplexity **{r['ppl']:.2f}** ({r['windows']} windows of {r['window']} "
                   "tokens).")
    for name, r in (evals.get("tasks") or {}).items():
        err = f" ± {r['acc_stderr']:.3f}" if r.get("acc_stderr") is not None else ""
        out.append(f"- `saap-edge eval`: {name} zero-shot accuracy {r['acc']:.3f}{err} (n = {r['n']}).")
    if not ppl and not evals:
        out.append("Nothing measured yet: `saap-edge eval " + dir_name + " --ppl wikitext2` adds perplexity here.")
    out += ["", "## Files and how to run them", "",
            "- `model.safetensors` + `config.json` (transformers; the slim architecture's code is in `slim.py`): "
            "`AutoModelForCausalLM.from_pretrained(\"" + dir_name + "\", trust_remote_code=True)`, or "
            "`import saap_edge` first and leave out `trust_remote_code`."]
    for a in artifacts:
        rel = a.name
        if a.suffix == ".gguf":
            out.append(f"- `{rel}` (llama.cpp): `llama-cli -m {rel} -cnv`, llama-cpp-python `Llama(\"{rel}\")`, "
                       f"`saap-edge run {dir_name}/{rel} --chat`"
                       + (f"; Ollama: `ollama create {dir_name} -f Modelfile`" if (directory / "Modelfile").is_file()
                          else f"; Ollama: a Modelfile with `FROM ./{rel}`") + ".")
        else:
            out.append(f"- `{rel}/` (onnxruntime): onnxruntime-genai `og.Model(\"{rel}\")` (its genai_config.json), or "
                       f"`saap-edge run {dir_name}/{rel} --chat`.")
    if not artifacts:
        out.append(f"- No device file yet: `saap-edge export {dir_name} --format gguf` (or `onnx`) writes one here.")
    out += ["", "## Limits", ""]
    limits = []
    for name, r in ppl.items():
        dense, final = (r.get("before") or {}).get("ppl"), (r.get("recovered") or r.get("after") or {}).get("ppl")
        if dense and final:
            limits.append(f"- {name} perplexity is {final / dense:.2f}x the dense model's ({final:.2f} against "
                          f"{dense:.2f}) on the windows above.")
    limits.append("- Structured pruning removes whole heads and MLP channels: expect weaker long-form and knowledge-heavy "
                  "answers than the dense model at the same prompt; compare both with `saap-edge compare`.")
    out += limits
    versions = report.versions or {}
    if versions:
        out += ["", "Made with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(out) + "\n"


def write_card(directory: Path, name: str | None = None) -> Path:
    """(Re)write `directory`/README.md from the directory's files."""
    path = Path(directory) / CARD_FILE
    write_file(path, card_text(directory, name))
    return path


def record_eval(directory: Path, result: dict) -> None:
    """Merge `saap-edge eval` results into `directory`/eval.json and rewrite the card."""
    from saap_edge.outputs import write_json

    data = _read(Path(directory) / EVAL_FILE)
    for key in ("ppl", "tasks"):
        if result.get(key):
            data.setdefault(key, {}).update(result[key])
    write_json(Path(directory) / EVAL_FILE, data)
    write_card(directory)
