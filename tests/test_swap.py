"""unmerge and rebase: round trips within the bound, rebuilds bit-identical, provenance checks.

The bound: every element within 1 ulp of the exact result, the ulp taken at the largest
magnitude the element passed through (max of |exact| and |merged input|): the bits the first
merge rounded away cannot come back, and a correct single-rounding unmerge always meets it.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import ADAPTERS, GPT2, LLAMA
from peft_oracle import logits_of, logits_unmerged, probe_ids
from reference import load_base, ulp

from loramerge.merge import MergeOptions, merge
from loramerge.sink.hf_folder import NORMS_FILE
from loramerge.swap import rebase, unmerge


def _within_bound(candidate: dict, exact: dict, merged: dict) -> tuple[float, float]:
    """Assert the bound for every tensor; return (max ulps, share bit-exact)."""
    assert candidate.keys() == exact.keys()
    worst, same, total = 0.0, 0, 0
    for name, got in candidate.items():
        want = exact[name]
        scale = want.double().abs()
        if name in merged and merged[name].shape == want.shape:
            scale = scale.maximum(merged[name].double().abs())
        err = (got.double() - want.double()).abs() / ulp(scale, got.dtype)
        assert float(err.max()) <= 1.0, f"{name}: {float(err.max()):.3f} ulp"
        worst = max(worst, float(err.max()))
        same += int((got == want).sum())
        total += got.numel()
    return worst, same / total


CASES = {
    "llama-lora": (LLAMA, ["llama-lora"], (1.0,)),
    "llama-rslora": (LLAMA, ["llama-rslora"], (1.0,)),
    "llama-patterns": (LLAMA, ["llama-patterns"], (1.0,)),
    "llama-embed": (LLAMA, ["llama-embed"], (1.0,)),
    "llama-dora": (LLAMA, ["llama-dora"], (1.0,)),
    "gpt2-lora": (GPT2, ["gpt2-lora"], (1.0,)),
    "two-weighted": (LLAMA, ["llama-lora", "llama-lora-b"], (0.7, -0.5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_then_unmerge_returns_the_base(tmp_path, case):
    base, adapters, weights = CASES[case]
    paths = [ADAPTERS / a for a in adapters]
    merged, out = tmp_path / "merged", tmp_path / "out"
    merge(base, paths, merged, MergeOptions(weights=weights))
    result = unmerge(merged, paths, out)  # weights come from the record
    worst, exact = _within_bound(load_base(out), load_base(base), load_base(merged))
    print(f"\n{case}: unmerge max {worst:.3f} ulp, {exact:.4%} bit-exact")
    assert result.drift["measured"] and result.drift["max_ulp"] == pytest.approx(worst)
    assert json.loads((out / "loramerge.json").read_text())["adapters"] == []


def test_unmerge_one_of_two(tmp_path):
    a, b = ADAPTERS / "llama-lora", ADAPTERS / "llama-dora"
    merge(LLAMA, [a, b], tmp_path / "both")
    merge(LLAMA, [b], tmp_path / "only-b")
    unmerge(tmp_path / "both", [a], tmp_path / "out")
    exact, merged = load_base(tmp_path / "only-b"), load_base(tmp_path / "both")
    _within_bound(load_base(tmp_path / "out"), exact, merged)
    record = json.loads((tmp_path / "out" / "loramerge.json").read_text())
    assert [x["source"] for x in record["adapters"]] == [str(b)]
    assert record["dora_norms"]["vectors"] == 6  # b's norms carried over


def test_records_name_each_adapter_by_the_sha256_of_its_weights(tmp_path):
    """The hashes run while the pass does (an adapter taken out is hashed once, to find it):
    every record entry still holds its own file's sha256, the taken-out ones are dropped."""
    a, b = ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora"

    def entries(folder) -> list[tuple[str, str]]:
        record = json.loads((folder / "loramerge.json").read_text())
        return [(e["source"], e["sha256"]) for e in record["adapters"]]

    def own(adapter) -> tuple[str, str]:
        digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes())
        return str(adapter), digest.hexdigest()

    merge(LLAMA, [a, b], tmp_path / "both")
    assert entries(tmp_path / "both") == [own(a), own(b)]
    unmerge(tmp_path / "both", [a], tmp_path / "b")
    assert entries(tmp_path / "b") == [own(b)]
    rebase(tmp_path / "b", [b], [a], tmp_path / "a")
    assert entries(tmp_path / "a") == [own(a)]
    rebase(tmp_path / "a", [a], [a], tmp_path / "again", base=LLAMA)  # a's hash reused
    assert entries(tmp_path / "again") == [own(a)]


def test_rebase_without_base_is_within_bound_and_with_base_is_bit_identical(tmp_path):
    a, b = ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora"
    merge(LLAMA, [a], tmp_path / "a")
    merge(LLAMA, [b], tmp_path / "direct")
    result = rebase(tmp_path / "a", [a], [b], tmp_path / "swapped")
    worst, exact = _within_bound(
        load_base(tmp_path / "swapped"), load_base(tmp_path / "direct"), load_base(tmp_path / "a")
    )
    print(f"\nrebase without --base: max {worst:.3f} ulp, {exact:.4%} bit-exact")
    assert result.drift["measured"]
    rebase(tmp_path / "a", [a], [b], tmp_path / "rebuilt", base=LLAMA)
    direct = (tmp_path / "direct" / "model.safetensors").read_bytes()
    assert (tmp_path / "rebuilt" / "model.safetensors").read_bytes() == direct


def test_twenty_rebases_drift_is_measured(tmp_path):
    """Swap back and forth 20 times without the base; report the drift the docs quote."""
    a, b = ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"
    merge(LLAMA, [a], tmp_path / "m0")
    current, inside, outside = tmp_path / "m0", a, b
    for step in range(1, 21):
        nxt = tmp_path / f"m{step}"
        rebase(current, [inside], [outside], nxt)
        if step > 1:
            import shutil

            shutil.rmtree(current)
        current, inside, outside = nxt, outside, inside
    merge(LLAMA, [inside], tmp_path / "exact")
    merge(LLAMA, [outside], tmp_path / "other")
    got, exact, other = (load_base(tmp_path / n) for n in (current.name, "exact", "other"))
    worst, same, total = 0.0, 0, 0
    for name, tensor in got.items():
        # every magnitude the element passed through: W0 + dA and W0 + dB, alternately
        scale = exact[name].double().abs().maximum(other[name].double().abs())
        err = (tensor.double() - exact[name].double()).abs() / ulp(scale, tensor.dtype)
        worst = max(worst, float(err.max()))
        same += int((tensor == exact[name]).sum())
        total += tensor.numel()
    print(f"\n20 rebases: max {worst:.2f} ulp, {same / total:.4%} bit-exact")
    history = json.loads((current / "loramerge.json").read_text())["history"]
    assert len(history) == 21 and [h["op"] for h in history[1:]] == ["rebase"] * 20
    assert worst <= 20.0  # 1 ulp per rebase at most; docs/swap-adapters.md quotes the measure


def test_dora_without_stored_norms_needs_base(tmp_path, cli):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-dora"], merged)
    (merged / NORMS_FILE).unlink()
    out = tmp_path / "out"
    result = cli("unmerge", merged, ADAPTERS / "llama-dora", "-o", out)
    assert result.code == 2 and "pass --base" in result.err and not out.exists()
    assert cli("unmerge", merged, ADAPTERS / "llama-dora", "-o", out, "--base", LLAMA).code == 0
    assert (out / "model.safetensors").read_bytes() == _base_bytes(tmp_path)


def _base_bytes(tmp_path):
    merge(LLAMA, [], tmp_path / "plain")
    return (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_modules_to_save_needs_base(tmp_path, cli):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-resized"], merged)
    out = tmp_path / "out"
    result = cli("unmerge", merged, ADAPTERS / "llama-resized", "-o", out)
    assert result.code == 2 and "modules_to_save" in result.err and "--base" in result.err
    assert not out.exists()
    assert cli("unmerge", merged, ADAPTERS / "llama-resized", "-o", out, "--base", LLAMA).code == 0
    assert (out / "model.safetensors").read_bytes() == _base_bytes(tmp_path)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 384


def test_removing_what_is_not_inside_fails_and_names_what_is(tmp_path, cli):
    merged, out = tmp_path / "merged", tmp_path / "out"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged)
    result = cli("unmerge", merged, ADAPTERS / "llama-rslora", "-o", out)
    assert result.code == 2 and "llama-lora" in result.err and not out.exists()
    forced = cli("unmerge", merged, ADAPTERS / "llama-rslora", "-o", out, "--force")
    assert forced.code == 0


def test_no_record_warns(tmp_path, cli):
    merged, out = tmp_path / "merged", tmp_path / "out"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged)
    (merged / "loramerge.json").unlink()
    result = cli("unmerge", merged, ADAPTERS / "llama-lora", "-o", out)
    assert result.code == 0 and "Warning:" in result.err and "nothing can be checked" in result.err


def test_rebase_base_check_names_worst_tensors(tmp_path, cli):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged, MergeOptions(weights=(0.5,)))
    record = json.loads((merged / "loramerge.json").read_text())
    record["adapters"][0]["weight"] = 1.0  # the record lies about what is inside
    (merged / "loramerge.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    args = ["rebase", merged, "--remove", ADAPTERS / "llama-lora", "--add"]
    result = cli(*args, ADAPTERS / "llama-rslora", "-o", out, "--base", LLAMA)
    assert result.code == 2 and "worst tensors" in result.err and "q_proj" in result.err
    assert not out.exists()  # checked after the rebuild is written, before it is renamed in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nor left aside
    dry = cli(*args, ADAPTERS / "llama-rslora", "-o", out, "--base", LLAMA, "--dry-run")
    assert dry.code == 2 and "worst tensors" in dry.err and not out.exists()
    forced = cli(*args, ADAPTERS / "llama-rslora", "-o", out, "--base", LLAMA, "--force")
    assert forced.code == 0 and (out / "loramerge.json").exists()


def test_inspect_shows_the_chain(tmp_path, cli):
    a, b, c = (ADAPTERS / n for n in ("llama-lora", "llama-rslora", "llama-patterns"))
    merge(LLAMA, [a], tmp_path / "1")
    assert cli("rebase", tmp_path / "1", "--remove", a, "--add", b, "-o", tmp_path / "2").code == 0
    assert cli("rebase", tmp_path / "2", "--remove", b, "--add", c, "-o", tmp_path / "3").code == 0
    report = json.loads(cli("inspect", tmp_path / "3", "--json").out)
    ops = [(h["op"], h["adapters"], h.get("removed")) for h in report["provenance"]["history"]]
    assert ops == [
        ("merge", [str(a)], None),
        ("rebase", [str(b)], [str(a)]),
        ("rebase", [str(c)], [str(b)]),
    ]
    assert [x["source"] for x in report["provenance"]["adapters"]] == [str(c)]
    assert "rebase" in cli("inspect", tmp_path / "3").out


def test_logits_of_unmerged_and_rebased_models(tmp_path):
    a, b = ADAPTERS / "llama-lora", ADAPTERS / "llama-dora"
    merge(LLAMA, [a], tmp_path / "a")
    unmerge(tmp_path / "a", [a], tmp_path / "base-again")
    rebase(tmp_path / "a", [a], [b], tmp_path / "b")
    merge(LLAMA, [b], tmp_path / "direct-b")
    ids = probe_ids(LLAMA)
    base_logits = logits_of(LLAMA, ids)
    reference_b = logits_unmerged(LLAMA, [b], [1.0], ids)
    unmerged = float((logits_of(tmp_path / "base-again", ids) - base_logits).abs().max())
    rebased = float((logits_of(tmp_path / "b", ids) - reference_b).abs().max())
    direct = float((logits_of(tmp_path / "direct-b", ids) - reference_b).abs().max())
    print(f"\nmax |dlogit|: unmerged vs base {unmerged:.2e}; rebased vs base+B {rebased:.2e};")
    print(f"a direct bf16 merge of B vs base+B {direct:.2e} (the bf16 rounding floor)")
    assert unmerged <= 2 * direct + 1e-4
    assert rebased <= 2 * direct + 1e-4


def test_unmerge_and_rebase_cli_outputs(tmp_path, cli):
    merged = tmp_path / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], merged)
    out = tmp_path / "out"
    result = cli("unmerge", merged, ADAPTERS / "llama-lora", "-o", out, "--verify", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["command"] == "unmerge" and summary["drift"]["measured"]
    assert summary["verification"]["passed"]
    table = cli(
        "rebase",
        merged,
        "--remove",
        ADAPTERS / "llama-lora",
        "--add",
        ADAPTERS / "llama-rslora",
        "-o",
        tmp_path / "r",
    )
    assert table.code == 0 and "drift against the exact result" in table.out
    dry = cli("unmerge", merged, ADAPTERS / "llama-lora", "-o", tmp_path / "dry", "--dry-run")
    assert dry.code == 0 and not (tmp_path / "dry").exists()


def test_merge_unmerge_verify_unmerge_chain(tmp_path, cli):
    """The chain docs/verify.md shows: every check passes on the one ulp scale, the record
    lists what each output was computed from, and the second unmerge's drift stays small."""
    lora, dora = ADAPTERS / "llama-lora", ADAPTERS / "llama-dora"
    m_a, m_un1, m_un2 = tmp_path / "m_a", tmp_path / "m_un1", tmp_path / "m_un2"
    assert cli("merge", LLAMA, lora, dora, "-w", 0.8, "-w", 1, "-o", m_a).code == 0
    first = cli("unmerge", m_a, lora, "-o", m_un1, "--json")
    assert first.code == 0, first.err
    check = cli("verify", m_un1, "--base", LLAMA, "--adapter", dora, "--json")
    assert check.code == 0, check.out
    report = json.loads(check.out)
    assert report["through"] == [str(m_a)] and report["tolerance_ulp"] == 1.0
    second = cli("unmerge", m_un1, dora, "-o", m_un2, "--json")
    assert second.code == 0, second.err
    drift = json.loads(second.out)["drift"]
    record = json.loads((m_un2 / "loramerge.json").read_text())
    assert record["computed_from"] == [str(m_un1), str(m_a)]
    final = cli("verify", m_un2, "--base", LLAMA, "--json")
    assert final.code == 0, final.out
    assert json.loads(final.out)["tolerance_ulp"] == 1.5
    print(
        f"\nfirst unmerge {json.loads(first.out)['drift']['max_ulp']:.3f} ulp, second "
        f"{drift['max_ulp']:.3f} ulp (two roundings at the chain's magnitudes)"
    )
    assert drift["max_ulp"] <= 1.5
    # without the intermediate models the scale is smaller: said, not silently failed
    import shutil

    shutil.rmtree(m_a)
    partial = cli("verify", m_un2, "--base", LLAMA, "--json")
    assert any(str(m_a) in note for note in json.loads(partial.out)["notes"])
