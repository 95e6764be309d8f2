"""report.json goes through RunReport unchanged, and the recovered perplexities join the pruned
ones by the rule the before/after table relies on."""

import json

from saap_edge.run_report import RunReport


def _ppl(value, windows=64, window=128):
    return {"ppl": value, "windows": windows, "window": window}


def test_a_report_reads_and_writes_back_byte_identical_with_keys_it_does_not_know(tmp_path):
    data = {"model": {"kind": "alias", "model": "smollm2-135m"}, "settings": {"method": "saap", "ratio": 0.2},
            "reconstruction": {"method": "none"}, "params": {"before": 10, "after": 8, "removed_share": 0.2},
            "ppl": {"wikitext2": {"before": _ppl(50.0), "after": _ppl(80.0)}}, "time_s": {"load_s": 1.5},
            "memory_measured": {}, "recovery": {"recovery": "qalora", "group_size": 32},
            "a_later_version_key": [1, 2]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    report = RunReport.read(path)
    assert report.extra == {"a_later_version_key": [1, 2]} and report.recovery["group_size"] == 32
    out = tmp_path / "again.json"
    report.write(out)
    assert out.read_bytes() == path.read_bytes()


def test_recovered_ppl_keeps_the_dense_score_only_when_scored_on_the_same_windows():
    pruned = {"before": _ppl(50.0), "after": _ppl(80.0)}
    same = RunReport(ppl={"wikitext2": dict(pruned)})
    same.add_recovered_ppl({"wikitext2": _ppl(70.0)}, before={"wikitext2": _ppl(81.0)})
    assert same.ppl["wikitext2"] == {"before": _ppl(50.0), "after": _ppl(81.0), "recovered": _ppl(70.0)}
    other = RunReport(ppl={"wikitext2": dict(pruned)})
    other.add_recovered_ppl({"wikitext2": _ppl(70.0, windows=8)}, before={"wikitext2": _ppl(81.0, windows=8)})
    assert other.ppl["wikitext2"]["before"] is None
    inline = RunReport(ppl={"wikitext2": dict(pruned)})
    inline.add_recovered_ppl({"wikitext2": _ppl(70.0)})
    assert inline.ppl["wikitext2"] == {**pruned, "recovered": _ppl(70.0)}


def test_unset_sections_are_left_out():
    assert RunReport(model={"kind": "hf"}).to_dict() == {"model": {"kind": "hf"}, "settings": {}, "params": {}, "ppl": {},
                                                          "time_s": {}, "memory_measured": {}}
