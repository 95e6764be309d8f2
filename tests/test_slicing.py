"""Slicing: keep-all changes nothing, slicing equals masking, slim models save and reload."""

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_llama
from saap_edge.prune.groups import discover
from saap_edge.prune.plan import PrunePlan
from saap_edge.prune.slicing import apply_plan, mask_units


def _uneven_plan(model) -> PrunePlan:
    plan = PrunePlan.keep_all(discover(model))
    plan.layers[1].kv_groups = [1, 3]
    plan.layers[1].channels = list(range(0, 128, 2))
    plan.layers[2].kv_groups = [2]
    plan.layers[3].channels = list(range(96))
    return plan


def test_keep_all_plan_changes_no_logits():
    model = tiny_llama()
    x = torch.randint(0, 512, (2, 20))
    slim = apply_plan(model, PrunePlan.keep_all(discover(model)))
    assert torch.equal(slim(x).logits, model(x).logits)


def test_slicing_equals_masking_the_same_units():
    model = tiny_llama()
    x = torch.randint(0, 512, (2, 20))
    plan = _uneven_plan(model)
    slim = apply_plan(model, plan)
    assert slim.config.num_attention_heads_per_layer == [8, 4, 2, 8, 8, 8]
    assert slim.config.num_key_value_heads_per_layer == [4, 2, 1, 4, 4, 4]
    assert slim.config.intermediate_size_per_layer == [128, 64, 128, 96, 128, 128]
    mask_units(model, plan)
    torch.testing.assert_close(slim(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_generate_with_kv_cache_matches_full_forward():
    model = tiny_llama()
    slim = apply_plan(model, _uneven_plan(model))
    x = torch.randint(3, 512, (1, 6))
    out = slim.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=0)
    # greedy with the cache == argmax of a full forward over the generated prefix at each step
    for t in range(6, out.shape[1]):
        assert slim(out[:, :t]).logits[0, -1].argmax().item() == out[0, t].item()


def test_save_from_pretrained_in_fresh_process_gives_same_logits(tmp_path):
    model = tiny_llama()
    slim = apply_plan(model, _uneven_plan(model))
    slim.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").is_file()
    x = torch.randint(0, 512, (1, 10))
    torch.save(x, tmp_path / "x.pt")
    torch.save(slim(x).logits.detach(), tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, saap_edge
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        assert torch.equal(m(x).logits, torch.load({str(tmp_path / 'ref.pt')!r}))
        assert m.config.intermediate_size_per_layer == [128, 64, 128, 96, 128, 128]
        m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0)
        # and without saap_edge's registration, through the copied modeling file
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_remote_code_loading_without_saap_edge(tmp_path):
    model = tiny_llama(layers=2)
    plan = PrunePlan.keep_all(discover(model))
    plan.layers[0].kv_groups = [0]
    slim = apply_plan(model, plan)
    slim.save_pretrained(tmp_path)
    code = (
        "import sys; sys.modules['saap_edge'] = None\n"  # importing saap_edge now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(m.config.num_key_value_heads_per_layer)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "[1, 4]" in result.stdout, result.stderr[-2000:]


def test_plan_json_round_trip_and_checks(tmp_path):
    from saap_edge.errors import UserError

    model = tiny_llama()
    plan = _uneven_plan(model)
    plan.settings = {"method": "saap"}
    plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again == plan
    torch.testing.assert_close(apply_plan(model, again)(torch.arange(8)[None]).logits, apply_plan(model, plan)(torch.arange(8)[None]).logits)
    with pytest.raises(UserError, match="different sizes"):
        apply_plan(tiny_llama(n_kv=2), plan)


def _head_plan(model) -> PrunePlan:
    """Query-head slots and a whole attention module leave: layer 1 keeps 3 KV groups x 1 head,
    layer 2 no attention, layer 3 all 4 groups x 1 head; layer 2 keeps some MLP."""
    plan = PrunePlan.keep_all(discover(model))
    plan.layers[1].kv_groups, plan.layers[1].heads = [0, 2, 3], [1, 4, 7]
    plan.layers[2].kv_groups, plan.layers[2].channels = [], list(range(32, 96))
    plan.layers[3].heads = [0, 3, 4, 6]
    return plan


def test_head_slots_and_attention_free_layers_slice_as_they_mask_and_generate(tmp_path):
    model = tiny_llama()
    plan = _head_plan(model)
    slim = apply_plan(model, plan)
    assert slim.config.num_attention_heads_per_layer == [8, 3, 0, 4, 8, 8]
    assert slim.config.num_key_value_heads_per_layer == [4, 3, 0, 4, 4, 4]
    assert not [k for k in slim.state_dict() if k.startswith("model.layers.2.") and ("self_attn" in k or "input_layernorm" in k)]
    x = torch.randint(0, 512, (2, 20))
    masked = tiny_llama()
    mask_units(masked, plan)
    torch.testing.assert_close(slim(x).logits, masked(x).logits, rtol=0, atol=1e-5)
    # the KV cache (0 heads in the attention-free layer) gives the full forward's greedy tokens
    out = slim.generate(x[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=8, do_sample=False, pad_token_id=0)
    for t in range(6, out.shape[1]):
        assert slim(out[:, :t]).logits[0, -1].argmax().item() == out[0, t].item()
    slim.save_pretrained(tmp_path, safe_serialization=True)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again(x).logits, slim(x).logits)


def test_plans_check_heads_and_read_version_1(tmp_path):
    import json

    from saap_edge.errors import UserError

    model = tiny_llama()
    plan = _head_plan(model)
    plan.save(tmp_path / "plan.json")
    assert PrunePlan.load(tmp_path / "plan.json") == plan
    old = json.loads((tmp_path / "plan.json").read_text())
    old["version"] = 1
    for lp in old["layers"]:
        del lp["heads"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    v1 = PrunePlan.load(tmp_path / "v1.json")
    assert v1.layers[1].query_heads == [0, 1, 4, 5, 6, 7]  # every head of the kept groups
    uneven = _head_plan(model)
    uneven.layers[1].heads = [0, 1, 4]  # group 0 keeps two heads, group 2 one
    with pytest.raises(UserError, match="same number"):
        apply_plan(model, uneven)
    orphan = _head_plan(model)
    orphan.layers[1].heads = [2, 4, 7]  # head 2 belongs to group 1, which the plan removes
    with pytest.raises(UserError, match="query head 2"):
        apply_plan(model, orphan)
