"""Hardware what-ifs, profiles from specs, policies a profile cannot time, the byte formatter."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simulator.errors import InputError
from simulator.profile import CostModel, builtin_profiles, copy_ms_from_curve, load_profile
from simulator.runner import run_scenario
from simulator.scenario import load_scenario, parse_scenario
from simulator.spec_profiles import BASE_SPEC, SPECS, roofline_ms, spec_documents
from simulator.units import fmt_bytes
from simulator.what_if import apply_what_if, describe, merge_what_if, pageable_factor, parse_what_if_flags

from conftest import REPO, scenario_dict

H200 = load_profile("h200")
EB = 3 * 768 * 3072 * 4


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


# ------------------------------------------------------------------------------ scaling math
def test_pcie_GBps_sets_the_pinned_bandwidth_and_scales_the_measured_table():
    w = apply_what_if(H200, {"pcie_GBps": 25})
    pin, pin0 = w.copy_.h2d.pinned, H200.copy_.h2d.pinned
    assert pin.bandwidth_GBps == pytest.approx(25)
    s = 25 / pin0.bandwidth_GBps
    lat = pin0.latency_us * 1e-3
    for (b, ms), (b0, ms0) in zip(pin.table, pin0.table):
        assert b == b0
        assert ms == pytest.approx(min(ms0, lat) + max(0.0, ms0 - lat) / s)
    # a large copy is bandwidth-bound: its time grows by nearly the bandwidth ratio
    big = 1 << 30
    assert copy_ms_from_curve(pin, big) / copy_ms_from_curve(pin0, big) == pytest.approx(1 / s, rel=0.01)
    # the d2h pinned curve moves by the same ratio
    assert w.copy_.d2h.pinned.bandwidth_GBps == pytest.approx(H200.copy_.d2h.pinned.bandwidth_GBps * s)


def test_pageable_copies_are_staged_through_the_host():
    pin, pag = 58.7, 8.6
    # a faster link speeds a pageable copy, but less than the link
    f = pageable_factor(pin, pag, 2.0)
    assert 1.0 < f < 2.0
    host = 1 / (1 / pag - 1 / pin)
    assert pag * f == pytest.approx(1 / (1 / host + 1 / (2 * pin)))
    assert pageable_factor(pin, pag, 1.0) == pytest.approx(1.0)
    assert pageable_factor(10, 20, 3.0) == 3.0     # pageable not slower than pinned: like pinned


def test_latency_compute_and_host_scales():
    w = apply_what_if(H200, {"copy_latency_scale": 2, "gpu_compute_scale": 0.5, "cpu_compute_scale": 3,
                             "host_scale": 0.25})
    assert w.copy_.h2d.pinned.latency_us == pytest.approx(2 * H200.copy_.h2d.pinned.latency_us)
    assert w.copy_.h2d.pinned.bandwidth_GBps == pytest.approx(H200.copy_.h2d.pinned.bandwidth_GBps)
    key = "2048x1408-bf16-gated"
    assert [ms for _, ms in w.compute.gpu[key]] == pytest.approx([ms / 2 for _, ms in H200.compute.gpu[key]])
    assert [ms for _, ms in w.compute.cpu[key]] == pytest.approx([ms * 3 for _, ms in H200.compute.cpu[key]])
    assert w.host.launch_us.expert == pytest.approx(H200.host.launch_us.expert / 4)
    assert w.host.sync_us == pytest.approx(H200.host.sync_us / 4)
    e, e0 = w.engine["olmoe-1b-7b"], H200.engine["olmoe-1b-7b"]
    assert e.decode.ms[0][0] == pytest.approx(e0.decode.ms[0][0] / 2)
    st, st0 = e.styles["hf-eager"], e0.styles["hf-eager"]
    assert (st.base_ms, st.per_expert_ms) == pytest.approx((st0.base_ms / 4, st0.per_expert_ms / 2))
    off, off0 = e.styles["offload"], e0.styles["offload"]        # host terms measured in the executor
    assert (off.host_base_ms, off.host_per_expert_ms, off.host_per_load_ms) == pytest.approx(
        (off0.host_base_ms / 4, off0.host_per_expert_ms / 4, off0.host_per_load_ms / 4))
    pools = {"pinned_copy", "pageable_copy"}                     # copies: with their curves (below)
    assert e.in_situ.model_dump(exclude=pools) == e0.in_situ.model_dump(exclude=pools)   # ratios: unchanged
    assert e.in_situ.pinned_copy.ms > e0.in_situ.pinned_copy.ms    # twice the copy latency
    # the base profile is untouched (pure function) and an empty what-if is the identity
    assert load_profile("h200").to_json() == H200.to_json()
    assert apply_what_if(H200, {}) is H200


def test_what_if_is_named_in_provenance_and_results():
    w = apply_what_if(H200, {"pcie_GBps": 25, "host_scale": 0.5})
    assert w.name == "h200+what-if"
    assert w.provenance["what_if"] == {"pcie_GBps": 25, "host_scale": 0.5} and w.provenance["what_if_of"] == "h200"
    assert describe(w) == "h200 (calibrated) with pcie_GBps=25, host_scale=0.5"
    sc = parse_scenario(scenario_dict(profile="h200", replications=1, batch_sizes=[2],
                                      what_if={"pcie_scale": 0.5}))
    slow, fast = run_scenario(sc), run_scenario(parse_scenario(scenario_dict(profile="h200", replications=1,
                                                                             batch_sizes=[2])))
    assert slow.meta["profile_source"] == "h200 (calibrated) with pcie_scale=0.5"
    assert sc.effective()["what_if"] == {"pcie_scale": 0.5}
    by = {r["policy"]: r for r in fast.summary}
    for r in slow.summary:     # same decisions, slower copies
        assert r["transfers"] == by[r["policy"]]["transfers"]
        assert r["step_latency_ms"]["mean"] > by[r["policy"]]["step_latency_ms"]["mean"]


@pytest.mark.parametrize("doc, field, msg", [
    ({"pcie": 3}, "what_if.pcie", "unknown key"),
    ({"pcie_GBps": 0}, "what_if.pcie_GBps", "greater than 0"),
    ({"pcie_GBps": 20, "pcie_scale": 2}, "what_if", "not both"),
    ({"host_scale": "fast"}, "what_if.host_scale", "number"),
    ({"gpu_compute_scale": 1e9}, "what_if.gpu_compute_scale", "less than or equal"),
    (7, "what_if", ""),
])
def test_what_if_validation_names_the_field(doc, field, msg):
    with pytest.raises(InputError) as e:
        parse_scenario(scenario_dict(what_if=doc), "s.yaml")
    assert e.value.source == "s.yaml" and e.value.field == field and msg in e.value.message


@pytest.mark.parametrize("flags, msg", [
    (["pcie=3"], "unknown what-if 'pcie'"), (["pcie_GBps"], "write KEY=VALUE"),
    (["pcie_GBps=abc"], "'abc' is not a number"), (["pcie_GBps=-1"], "pcie_GBps: Input should be greater"),
])
def test_what_if_flags_are_checked(flags, msg):
    with pytest.raises(InputError) as e:
        parse_what_if_flags(flags)
    assert e.value.field == "--what-if" and msg in e.value.message


def test_flags_replace_the_scenarios_knob_and_its_partner(tmp_path):
    assert merge_what_if({"pcie_scale": 2, "host_scale": 3}, {"pcie_GBps": 25.0}) == \
        {"host_scale": 3, "pcie_GBps": 25.0}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(scenario_dict(what_if={"pcie_scale": 2})))
    sc, _ = load_scenario(p, {"what_if": {"pcie_GBps": 25.0}})
    assert sc.what_if.given() == {"pcie_GBps": 25.0}


def test_cli_run_and_sweep_take_what_ifs(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(scenario_dict(replications=1, batch_sizes=[2])))
    code, out, err = invoke("run", p, "-o", tmp_path / "r", "--what-if", "pcie_GBps=25", "--what-if", "host_scale=0.5")
    assert code == 0, err
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["profile_source"] == "h100-pcie5 (calibrated) with pcie_GBps=25, host_scale=0.5"
    assert "with pcie_GBps=25," in out and "host_scale=0.5;" in out     # the table's title (it wraps)
    assert yaml.safe_load((tmp_path / "r" / "scenario.yaml").read_text())["what_if"] == \
        {"pcie_GBps": 25.0, "host_scale": 0.5}
    code, _, err = invoke("run", p, "--what-if", "bogus=1")
    assert code == 2 and err.startswith("error: command line: --what-if: unknown what-if 'bogus'")
    sw = tmp_path / "sw.yaml"
    sw.write_text(yaml.safe_dump({"name": "sw", "base": str(p), "grid": {"batch_sizes": [1, 2]}}))
    code, _, err = invoke("sweep", sw, "-j", "1", "-q", "-o", tmp_path / "sw", "--what-if", "pcie_scale=0.5")
    assert code == 0, err
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "sw" / "results.parquet")
    assert set(rows["profile_source"]) == {"h100-pcie5 (calibrated) with pcie_scale=0.5"}


# ---------------------------------------------------------------------------- spec profiles
def test_spec_profiles_are_shipped_marked_and_current():
    docs = spec_documents()
    assert set(docs) == set(SPECS) and set(SPECS) <= set(builtin_profiles())
    for name, doc in docs.items():
        shipped = json.loads((REPO / "simulator" / "profiles" / f"{name}.json").read_text())
        assert shipped == doc, f"{name}.json is stale: run python -m simulator.spec_profiles"
        p = load_profile(name)
        assert p.provenance["kind"] == "from specs" and p.provenance["source"] == "from specs"
        assert describe(p) == f"{name} (from specs)"
    code, out, _ = invoke("profile", "list")
    assert "l40s-specs: from specs (not measured), NVIDIA L40S" in out
    assert "h200: calibrated" in out
    code, out, _ = invoke("profile", "show", "gh200-specs")
    assert "NOT MEASURED" in out.splitlines()[1] and "link 450.0 GB/s" in out


def test_spec_profiles_scale_by_their_numbers():
    l40s, gh200, h200s = (load_profile(n) for n in ("l40s-specs", "gh200-specs", "h200-specs"))
    base = H200.copy_.h2d.pinned.bandwidth_GBps
    assert l40s.copy_.h2d.pinned.bandwidth_GBps == pytest.approx(base * 31.5 / 63.0)
    assert gh200.copy_.h2d.pinned.bandwidth_GBps == pytest.approx(base * 450 / 63.0)
    assert h200s.copy_.h2d.pinned.bandwidth_GBps == pytest.approx(base)     # its own specs: unchanged
    for key, pts in H200.compute.gpu.items():
        assert [ms for _, ms in h200s.compute.gpu[key]] == pytest.approx([ms for _, ms in pts], rel=1e-12)
    key = "4096x14336-bf16-gated"
    # many tokens: compute-bound, times the FLOPS ratio (the launch overhead is small beside it)
    t, ms = l40s.compute.gpu[key][-1]
    assert ms / dict(H200.compute.gpu[key])[t] == pytest.approx(989 / 362, rel=0.05)
    # the roofline: memory-bound at one token, compute-bound at 4096
    assert roofline_ms(key, 1, BASE_SPEC) == pytest.approx(3 * 4096 * 14336 * 2 / 4.8e12 * 1e3)
    assert roofline_ms(key, 4096, BASE_SPEC) == pytest.approx(2 * 3 * 4096 * 14336 * 4096 / 989e12 * 1e3)
    # the host is assumed the same
    assert l40s.host == H200.host and l40s.compute.cpu == H200.compute.cpu


def test_spec_profile_run_says_from_specs(tmp_path):
    res = run_scenario(parse_scenario(scenario_dict(profile="rtx4090-specs", replications=1, batch_sizes=[2])))
    assert res.meta["profile_kind"] == "from specs" and res.meta["profile_source"] == "rtx4090-specs (from specs)"


# --------------------------------------------------------------------- skipping policies
def test_a_policy_the_profile_cannot_time_is_skipped_with_a_warning(tmp_path):
    pols = [{"name": "dedup"}, {"name": "cpu-miss", "cache": {"kind": "lru", "capacity": 16}, "miss": "cpu"}]
    sc = parse_scenario(scenario_dict(profile="h100-probe", policies=pols, replications=1, batch_sizes=[2],
                                      baseline="cpu-miss"))
    res = run_scenario(sc)
    assert {r["policy"] for r in res.summary} == {"dedup"}
    assert res.decision["skipped"][0]["policy"] == "cpu-miss"
    assert any(w.startswith("policy cpu-miss skipped: profile h100-probe has no CPU expert timings")
               for w in res.decision["warnings"])
    d = res.decision["per_batch"][0]      # the named baseline was skipped: the default rule, saying so
    assert d["baseline"] == "dedup" and "(the baseline cpu-miss was skipped)" in d["baseline_rule"]
    from simulator.output import write_results

    write_results(res, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["decision"]["skipped"][0]["policy"] == "cpu-miss"
    from simmoe.report import write_report

    md = write_report(tmp_path / "r")[0].read_text()
    assert "policy cpu-miss skipped" in md
    # every policy unsupported: one line, the run refused
    only = parse_scenario(scenario_dict(profile="h100-probe", policies=pols[1:], replications=1, batch_sizes=[2]))
    with pytest.raises(InputError) as e:
        run_scenario(only)
    assert e.value.field == "compute.cpu.768x3072-fp32-gated" and "every policy" in e.value.message


# ---------------------------------------------------------------------------- formatter
@pytest.mark.parametrize("n, text", [(0, "0 B"), (512, "512 B"), (4096, "4.0 KiB"), (EB, "27.0 MiB"),
                                     (17301504, "16.5 MiB"), (1.5 * 2**30, "1.5 GiB"), (2.5 * 2**40, "2.5 TiB")])
def test_one_byte_formatter(n, text):
    assert fmt_bytes(n) == text


def test_no_other_byte_formatter_in_the_sources():
    import re

    pat = re.compile(r"/ ?(2 ?\*\* ?20|2 ?\*\* ?30|1e6|1e9|1 ?<< ?20)\b.*(MB|MiB|GB|GiB)")
    offenders = []
    for folder in ("simmoe", "simulator"):
        for p in (REPO / folder).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if pat.search(line):
                    offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_validate_refuses_a_what_if(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(scenario_dict(what_if={"pcie_scale": 2})))
    code, _, err = invoke("validate", p, "--device", "cpu")
    assert code == 2 and err.startswith(f"error: {p}: what_if: validate measures this machine as it is")


def test_spec_expert_tables_do_not_drop_where_the_base_does_not():
    for name in SPECS:
        p = load_profile(name)
        for key, pts in H200.compute.gpu.items():
            derived = [ms for _, ms in p.compute.gpu[key]]
            base_most = most = 0.0
            for (_, ms), v in zip(pts, derived):
                if ms >= base_most:
                    assert v >= most, (name, key)
                base_most, most = max(base_most, ms), max(most, v)


def test_a_link_what_if_moves_the_in_situ_pool_copies_as_it_moves_their_curve():
    """OLMoE's in situ pool copies (h200: pinned and pageable, measured on the H200's link) are
    priced under a what-if link as the curve of their memory kind moves at their bytes, so an
    expert's copy in an executor style follows the what-if; a spec profile's likewise."""
    from simulator.profile import copy_ms_from_curve
    base = load_profile("h200")
    slow = apply_what_if(base, {"pcie_scale": 0.5})
    for memory in ("pinned", "pageable"):
        pc, ps = (getattr(p.engine["olmoe-1b-7b"].in_situ, f"{memory}_copy") for p in (base, slow))
        curve = (lambda p: p.copy_.h2d.pageable if memory == "pageable" else p.copy_.h2d.pinned)
        ratio = copy_ms_from_curve(curve(slow), pc.bytes) / copy_ms_from_curve(curve(base), pc.bytes)
        assert ps.bytes == pc.bytes and ps.ms == pytest.approx(pc.ms * ratio, rel=1e-12)
        assert ps.ms > pc.ms * (1.9 if memory == "pinned" else 1.0)   # half the link: about twice the copy
    fast = load_profile("gh200-specs").engine["olmoe-1b-7b"].in_situ.pinned_copy
    assert fast.ms < base.engine["olmoe-1b-7b"].in_situ.pinned_copy.ms / 5     # 450 against 63 GB/s
    assert apply_what_if(base, {"host_scale": 2.0}).engine["olmoe-1b-7b"].in_situ == base.engine["olmoe-1b-7b"].in_situ
