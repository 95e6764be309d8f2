"""`saap-edge compare`: the same prompts through several models, answers side by side.

Each model is an artifact a device runs (a .gguf file, an exported ONNX folder), a built-in
alias (its GGUF) or a saap-edge output directory (the artifact `export` wrote into it). Every
prompt is a chat turn through the model's own template (runtime/chat.py), or a raw
continuation with `--raw`; decoding is greedy unless sampling flags say otherwise, so the table
is reproducible. `--ppl N` adds WikiText-2 perplexity over the first N test windows of 128
tokens, computed in torch from the GGUF's own weights (int4 groups exact).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from saap_edge.errors import UserError

DEFAULT_PROMPTS = (
    "What are three things that make a healthy diet?",
    "Explain in two sentences why the sky is blue.",
    "Write a four-line poem about the sea.",
)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    generated_tokens: int
    decode_tok_s: float


@dataclass
class ModelAnswers:
    label: str
    artifact: str
    runtime: str = ""
    size_mib: float = 0.0
    template: str = ""
    answers: list[Answer] = field(default_factory=list)
    ppl: float | None = None
    ppl_note: str = ""


def resolve_artifact(name: str) -> Path:
    """The file a device runs for `name` (see the module doc); UserError naming the fix."""
    from saap_edge.models.load import ALIASES, resolve_model

    if name in ALIASES:
        return resolve_model(name)[1]
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file() or (path / "model.onnx").is_file():
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("model-*.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)
        onnx = sorted((p for p in path.glob("onnx-*") if (p / "model.onnx").is_file()), key=lambda p: p.stat().st_mtime,
                      reverse=True)
        if ggufs or onnx:
            return (ggufs or onnx)[0]
        raise UserError(f"{path} holds no exported artifact; export it first: saap-edge export {path} --format gguf")
    raise UserError(f"{name}: not a .gguf file, an exported ONNX folder, a saap-edge output directory or a built-in "
                    "alias (smollm2-135m)")


def read_prompts(path: Path | None) -> list[str]:
    """One prompt a line (blank lines skipped), or a JSON list of strings."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            prompts = [str(p) for p in json.loads(text)]
        except ValueError as exc:
            raise UserError(f"--prompts {path}: not a JSON list of strings ({exc})") from exc
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt; write one prompt a line")
    return prompts


def _label(name: str, artifact: Path) -> str:
    path = Path(name)
    if path.is_dir() and (path / "report.json").is_file():
        from saap_edge.files import read_json

        plan = read_json(path / "prune_plan.json", "prune plan") if (path / "prune_plan.json").is_file() else {}
        ratio = plan.get("ratio")
        return f"{path.name} ({ratio:.0%} pruned)" if isinstance(ratio, (int, float)) else path.name
    return name if not path.exists() else artifact.name


def answer_all(name: str, prompts: list[str], chat: bool, max_new_tokens: int, sampling, threads: int | None = None,
               system: str | None = None, progress=None) -> ModelAnswers:
    """Every prompt through one model; each chat prompt is its own one-turn conversation."""
    from runtime import open_runtime
    from runtime.base import Generator, RuntimeLoadError
    from runtime.chat import ChatSession, template_for

    from saap_edge.bench.weights import artifact_bytes

    artifact = resolve_artifact(name)
    out = ModelAnswers(_label(name, artifact), str(artifact), size_mib=artifact_bytes(artifact) / 2**20)
    try:
        rt = open_runtime(str(artifact), threads)
        out.runtime = rt.name
        template = template_for(artifact, rt) if chat else None
    except RuntimeLoadError as exc:
        raise UserError(f"{name}: {exc}") from exc
    out.template = template.source if template else "raw continuation"
    try:
        for prompt in prompts:
            if template is not None:
                session = ChatSession(rt, template, sampling, max_new_tokens, system)
                text = "".join(session.reply(prompt)).strip()
                stats = session.generator.stats
            else:
                gen = Generator(rt)
                text = "".join(gen.stream(prompt, max_new_tokens, sampling)).strip()
                stats = gen.stats
            out.answers.append(Answer(text, stats.prompt_tokens, stats.generated_tokens, stats.decode_tok_s))
            if progress is not None:
                progress.update(1)
    finally:
        close = getattr(rt, "close", None)
        if close:
            close()
    return out


def add_perplexity(m: ModelAnswers, limit: int, data_dir: str | None) -> None:
    """WikiText-2 perplexity of a GGUF artifact's own weights (torch, int4 exact)."""
    if not m.artifact.endswith(".gguf"):
        m.ppl_note = "not computed for ONNX folders (compare the GGUF export)"
        return
    from saap_edge.eval.ppl import evaluate_ppl
    from saap_edge.models.load import load_model

    loaded = load_model(m.artifact, "cpu", "float32")
    r = evaluate_ppl(loaded.model, loaded.tokenizer, ["wikitext2"], limit=limit, data_dir=data_dir, progress=False)
    m.ppl = r["wikitext2"]["ppl"]
    m.ppl_note = f"WikiText-2 test, first {r['wikitext2']['windows']} windows of 128 tokens"


def repeats(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some word n-gram occurs more than `times` times (a looping answer)."""
    words = text.split()
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] > times:
            return True
    return False


def markdown(models: list[ModelAnswers], prompts: list[str], settings: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"

    lines = ["# saap-edge compare", "", settings, "",
             "| model | artifact | runtime | MiB | template | mean decode tok/s | answers looping | mean answer tokens |"
             + (" WikiText-2 PPL |" if any(m.ppl is not None or m.ppl_note for m in models) else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if any(m.ppl is not None or m.ppl_note for m in models) else "")]
    for m in models:
        speeds = [a.decode_tok_s for a in m.answers if a.decode_tok_s]
        loops = sum(repeats(a.text) for a in m.answers)
        mean_len = sum(a.generated_tokens for a in m.answers) / max(len(m.answers), 1)
        row = (f"| {m.label} | `{Path(m.artifact).name}` | {m.runtime} | {m.size_mib:,.1f} | {cell(m.template)} | "
               f"{sum(speeds) / len(speeds) if speeds else 0:.1f} | {loops} of {len(m.answers)} | {mean_len:.0f} |")
        if any(x.ppl is not None or x.ppl_note for x in models):
            row += f" {m.ppl:.2f} |" if m.ppl is not None else f" {m.ppl_note or '-'} |"
        lines.append(row)
    notes = sorted({m.ppl_note for m in models if m.ppl is not None})
    if notes:
        lines += ["", "Perplexity: " + "; ".join(notes) + ", computed in torch from each GGUF's weights."]
    for i, prompt in enumerate(prompts):
        lines += ["", f"## {i + 1}. {cell(prompt)}", "", "| model | answer | tokens | decode tok/s |", "|---|---|---|---|"]
        for m in models:
            a = m.answers[i]
            lines.append(f"| {m.label} | {cell(a.text)} | {a.generated_tokens} | {a.decode_tok_s:.1f} |")
    return "\n".join(lines) + "\n"


def compare(names: list[str], prompts: list[str], chat: bool = True, max_new_tokens: int = 128, sampling=None,
            threads: int | None = None, system: str | None = None, ppl_limit: int | None = None,
            data_dir: str | None = None, progress: bool = True) -> tuple[list[ModelAnswers], str]:
    from tqdm import tqdm

    from runtime.base import Sampling

    if not names:
        raise UserError("give at least one model to compare (a .gguf, an ONNX folder, a saap-edge output directory)")
    sampling = sampling or Sampling()
    t0 = time.perf_counter()
    bar = tqdm(total=len(names) * len(prompts), desc="compare", unit="answer", disable=not progress)
    try:
        models = [answer_all(n, prompts, chat, max_new_tokens, sampling, threads, system, bar) for n in names]
    finally:
        bar.close()
    if ppl_limit:
        for m in models:
            add_perplexity(m, ppl_limit, data_dir)
    how = "chat turns through each model's own template" if chat else "raw continuations"
    decoding = "greedy" if sampling.temperature == 0 else (f"temperature {sampling.temperature:g}, top-k {sampling.top_k}, "
                                                           f"top-p {sampling.top_p:g}, seed {sampling.seed}")
    settings = (f"{len(prompts)} prompts as {how}; {decoding}; at most {max_new_tokens} new tokens an answer; batch 1 on "
                f"the CPU, one process, models one after another ({time.perf_counter() - t0:.0f} s). Decode tok/s counts "
                "the steps after the first generated token. Looping: an answer in which a 4-word sequence occurs more "
                "than 3 times.")
    return models, markdown(models, prompts, settings)
