"""The in situ factor on the decode layer's host part only (``engine.<model>.decode_host``).

The factor is measured at context 256, where a layer's wall is its host part (the issue of
its kernels); at large batch x context the wall is GPU work, which the host's speed in a step
does not change. With ``decode_host`` the engine prices a layer as max(k x host, GPU) + rest;
without it, as the whole wall times k (older profiles keep their numbers)."""
from __future__ import annotations

import copy

import pytest

from calibrate.measurements.engine_profile import part_grid_section
from simulator.engine_costs import DenseCost, GridCost, SituDecode
from simulator.profile import EngineGrid, load_profile, parse_profile

B, C = [1, 16], [256, 4096]


def grid(ms) -> GridCost:
    return GridCost(EngineGrid(batch=B, context=C, ms=ms))


WALL = grid([[0.9, 1.0], [0.95, 2.4]])      # host-bound except at B=16 x 4096
HOST = grid([[0.88, 0.9], [0.9, 0.92]])
GPU = grid([[0.2, 0.3], [0.3, 1.9]])


def test_a_host_bound_layer_scales_its_host_part():
    s = SituDecode(WALL, HOST, GPU, 1.25)
    assert s.ms(1, 256) == pytest.approx(0.9 + 0.25 * 0.88)
    assert s.ms(1, 256) < 0.9 * 1.25                       # the rest is not scaled


def test_a_gpu_bound_layer_keeps_its_wall_while_k_x_host_stays_below_the_gpu():
    assert SituDecode(WALL, HOST, GPU, 1.25).ms(16, 4096) == pytest.approx(2.4)
    # a slower host (k x host past the GPU's 1.9 ms) shows again
    assert SituDecode(WALL, HOST, GPU, 2.5).ms(16, 4096) == pytest.approx(2.5 * 0.92 + 2.4 - 1.9)


def test_without_a_host_grid_or_at_k_one_the_wall_scales_as_before():
    assert SituDecode(WALL, None, GPU, 1.25).ms(16, 4096) == 2.4 * 1.25
    assert SituDecode(WALL, HOST, GPU, 1.0).ms(16, 4096) == 2.4


def test_the_host_grid_comes_from_each_points_host_ms_capped_at_its_time():
    table = {"batch": [1], "context": [8, 16], "points": [[{"ms": 1.0, "host_ms": 0.9}, {"ms": 1.1, "host_ms": 1.3}]]}
    g = part_grid_section(table, "host_ms")
    assert g["ms"] == [pytest.approx([0.9, 1.1])]          # 1.3 capped at the point's 1.1
    assert part_grid_section({**table, "points": [[{"ms": 1.0}, None]]}, "host_ms") is None


def test_the_shipped_profile_prices_olmoe_at_b256_and_4000_below_the_scaled_wall():
    """With a step's factor of 1.3, OLMoE's layer at B=256 and context 4,000 (GPU-bound:
    6.3 of its 7.3 ms over a contiguous cache) is not scaled; at B=1 and 256 it is."""
    doc = copy.deepcopy(load_profile("h200").to_json())
    assert "decode_host" in doc["engine"]["olmoe-1b-7b"]
    doc["engine"]["olmoe-1b-7b"]["in_situ"]["dense"] = 1.3
    t = parse_profile(doc, "p").engine["olmoe-1b-7b"]
    del doc["engine"]["olmoe-1b-7b"]["decode_host"]
    old = parse_profile(doc, "p").engine["olmoe-1b-7b"]
    kw = dict(style="offload-grouped", phases=[0], start_context=4000)
    big = DenseCost(batch=256, tokens=[256], tables=t, **kw).dense_ms(0, 0)
    big_old = DenseCost(batch=256, tokens=[256], tables=old, **kw).dense_ms(0, 0)
    small = DenseCost(batch=1, tokens=[1], tables=t, **{**kw, "start_context": 256}).dense_ms(0, 0)
    small_old = DenseCost(batch=1, tokens=[1], tables=old, **{**kw, "start_context": 256}).dense_ms(0, 0)
    assert big < 0.8 * big_old
    assert big == pytest.approx(GridCost(t.decode).ms(256, 4000), rel=0.02)
    assert small == pytest.approx(small_old, rel=0.03) and small > 1.2 * GridCost(t.decode).ms(1, 256)
