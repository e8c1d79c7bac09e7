"""The real-model executor: a built transformers model whose routed experts live in host memory.

Every MoE block's ``experts`` module is replaced by :class:`OffloadedExperts` (no fork of
transformers): the model's attention, norms, router and shared experts run as transformers
runs them; at each MoE layer the same :class:`~simulator.planner.Planner` the simulator uses
decides, from the same policy objects and trace, what is loaded, hit, evicted, prefetched or
run on the CPU, and this module executes those operations:

- ``LOAD``: the expert's weights (``gate_up_proj[e]`` and ``down_proj[e]``, one flat host
  buffer, pinned or pageable per policy) copied into a GPU slot of one preallocated pool, on a
  copy stream, after the last compute that read the slot (CUDA);
- ``COMPUTE``: the expert FFN, transformers' own math (``act(gate) * up``, down projection,
  routing weight), on the tokens the routing sends to it, reading the slot, after its load;
- ``CPU``: the same FFN on the host weights, the tokens copied to the host and back;
- ``DEQUANT`` (a policy with ``expert_dtype``: int8, fp8, int4): the host holds each expert
  quantised as well (:func:`calibrate.executors.quant.quantise`), a ``LOAD`` copies those
  bytes into the slot's staging buffer, and the dequantise (:func:`~calibrate.executors.quant.dequantise`)
  fills the slot on the compute stream after the copy; the computes read the slot as before.
  The prompt's prefill still reads the full-precision host weights;
- ``DIRECT`` (``miss: direct``, pinned memory): the expert FFN on the GPU over its weights in
  mapped pinned host memory (no slot, no copy: the kernels read host memory over PCIe), on
  the tokens the routing sends to it, in the op's place among the layer's operations.

Routing: ``forced`` (the trace's experts replace the router's top-k, so a recorded or
synthetic trace drives the real model; the router still runs and its choice still comes to
the host, as a runtime's would) or ``own``: the trace is first recorded from the model's own
router (:func:`record_routing`, every expert resident) and then forced, which with the same
inputs is the same routing (``executed["router_agrees"]`` counts the MoE layers whose router
chose what the trace forced).

Dispatch: ``loop`` (engine style ``offload``: one FFN per planned compute), ``grouped``
(``offload-grouped``: a layer's ready experts in one grouped GEMM, :func:`simulator.engine_styles.group_layer`)
or ``graphs`` (``offload-graphs``: grouped, and the non-expert parts of each decode step replayed
from piecewise CUDA graphs over a static KV cache of the prompt and every step,
:mod:`calibrate.executors.graphs`; on the CPU the same pieces run eagerly).

What ran is counted from the module's own work (copies, bytes copied, experts computed and
the tokens they computed, CPU experts), and every routed (token, expert) pair must have been
served by exactly one compute: a plan that missed a pair or served one twice raises.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from calibrate.executors.quant import dequantise, mapped_view, quantise
from calibrate.measurements import host_state
from calibrate.models.build import BuiltModel
from simulator.engine_styles import GROUP, group_layer
from simulator.planner import COMPUTE, CPU, DENSE, DEQUANT, DIRECT, LOAD, Planner
from simulator.scenario import PolicySpec
from simulator.traces import Trace


@dataclass
class ModelStep:
    step: int
    latency_ms: float
    executed: dict = field(default_factory=dict)
    probe: dict | None = None  # the host-speed probe just before the step (``probe=True``)
    host_fast: bool | None = None  # ended in the host's fast state (None: no host gate)


class OffloadedExperts(torch.nn.Module):
    """Stands in for one MoE layer's routed experts; executes the planner's operations."""

    def __init__(self, ex: "ModelExecutor", layer: int, act_fn):
        super().__init__()
        self.ex, self.layer, self.act_fn = ex, layer, act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.ex._run_layer(self.layer, hidden_states, top_k_index, top_k_weights, self.act_fn)


class ReleasedExperts(torch.nn.Module):
    """What a released executor leaves in a block: the activation only (the next executor's)."""

    def __init__(self, act_fn):
        super().__init__()
        self.act_fn = act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise RuntimeError("this model's experts were released with their executor: make a new ModelExecutor")


class ModelExecutor:
    """Runs one policy over one decode trace on a built model (``cuda[:N]`` or ``cpu``)."""

    def __init__(self, built: BuiltModel, policy: PolicySpec, trace: Trace, *, device: str = "cpu",
                 seed: int = 0, prompt_tokens: int = 4, host: list[list[torch.Tensor]] | None = None,
                 probe: bool = False, dispatch: str = "loop", planner: Planner | None = None,
                 cost=None, dense_ms: float = 0.0):
        """``planner``: a planner of the caller's (a serving run's, over steps it builds; see
        :mod:`calibrate.executors.serving`) in place of a plain one over ``trace``. ``cost`` and
        ``dense_ms``: what the planner's queue model is priced with for a cost-aware miss policy
        (``miss: cheapest``): the projection's own (:func:`simulator.runner.cost_model` of the
        row's scenario, and its ``dense_ms``), so that both take the same decisions."""
        if planner is None and (trace.phase != 0).any():
            raise ValueError("the model executor runs decode steps only (the trace has a prefill step)")
        if policy.host is not None:
            raise ValueError(f"policy {policy.name!r}: disk tiers run live in the twin executor only "
                             "(simmoe validate), not yet in the real model")
        m = policy.miss
        served = set(m.choices or ("copy", "direct", "cpu")) if m.kind == "cheapest" else {m.kind}
        if policy.expert_dtype is not None and served & {"cpu", "direct"}:
            how = " and ".join(sorted(served & {"cpu", "direct"}))
            raise ValueError(f"policy {policy.name!r}: {how} misses of quantised experts run in the twin executor "
                             "only (the real model's read full-precision host weights)")
        if m.kind == "cheapest" and cost is None and planner is None:
            raise ValueError(f"policy {policy.name!r}: a cost-aware miss policy decides on predicted stream "
                             "times: the executor needs the projection's cost model (cost=)")
        self.b, self.policy, self.trace = built, policy, trace
        self.probe = probe  # time calibrate.measurements.host_speed's probe before each step
        if dispatch not in ("loop", "grouped", "graphs"):
            raise ValueError(f"dispatch {dispatch!r}: loop (one FFN per expert), grouped (one grouped GEMM per "
                             "call) or graphs (grouped, the non-expert parts replayed from CUDA graphs)")
        if dispatch == "graphs" and planner is not None:
            raise ValueError("dispatch graphs replays one batch size's decode step; a serving run's steps vary")
        # engine styles offload-grouped and offload-graphs (simulator/engine_styles.py)
        self.grouped = dispatch in ("grouped", "graphs")
        self.graphs = None if dispatch != "graphs" else False   # the GraphedLayers, made at start()
        self.spec = built.spec
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.E, self.H, self.F = self.spec.num_experts, self.spec.hidden, self.spec.ffn
        self.planner = planner if planner is not None else Planner(self.spec, policy, trace, seed=seed, cost=cost,
                                                                   dense_ms=dense_ms)
        blocks = built.moe_blocks()
        # host[layer][expert]: flat weights; shared between runs with ``host`` (host_experts)
        self.host = host if host is not None else host_experts(built, policy.memory == "pinned" and self.cuda)
        self.dtype = self.host[0][0].dtype
        n_slots = self.planner.total_slots
        self.pool = torch.empty((n_slots, 3 * self.H * self.F), dtype=self.dtype, device=self.device)
        # quantised copies: the experts' stored bytes in host memory, a staging buffer per slot
        self.quant = policy.expert_dtype
        self.host_q = self.stage = None
        if self.quant:
            self.host_q = quantised_host(self.host, self.quant, policy.memory == "pinned" and self.cuda, self.device)
            self.stage = torch.empty((n_slots, self.host_q[0][0].numel()), dtype=torch.uint8, device=self.device)
        for key, slot in self.planner.preloaded:
            if self.quant:
                dequantise(self.host_q[key // self.E][key % self.E].to(self.device), self.quant, self.pool[slot])
            else:
                self.pool[slot].copy_(self.host[key // self.E][key % self.E])
        for l, blk in enumerate(blocks):
            blk.experts = OffloadedExperts(self, l, blk.experts.act_fn)   # frees the resident experts
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        #: a grouped call sends its indices before it waits for its copies (False: after, the
        #: order before 2026-12-06, kept for bench/probe_live_timeline.py's comparison)
        self.upload_first = True
        self.last_load: dict[int, object] = {}
        self.last_read: dict[int, object] = {}
        self._mapped: dict[int, torch.Tensor] = {}   # host pointer -> its mapped view (direct reads)
        self.prompt = self.next_ids = None
        if planner is None:
            self.prompt, self.next_ids = decode_inputs(built.arch.vocab, int(trace.max_step_tokens), trace.num_steps,
                                                       prompt_tokens, seed, self.device)
        self.cache = None
        self._ops: list[list[tuple]] = []
        self._executed: dict = {}
        self._step = -1

    def release(self) -> None:
        """Free the GPU memory this executor holds (its slot pool, KV cache, CUDA graphs): the
        blocks keep only their activations, so a run of many rows (a static cache of 34 GB at
        B=64 and 4,000 tokens, each) never holds two executors' memory."""
        for blk in self.b.moe_blocks():
            if isinstance(blk.experts, OffloadedExperts) and blk.experts.ex is self:
                blk.experts = ReleasedExperts(blk.experts.act_fn)
        self.pool = self.cache = self.graphs = self.last_logits = self.stage = self.host_q = None
        self._mapped.clear()
        self.last_load.clear()
        self.last_read.clear()
        if self.cuda:
            import gc
            gc.collect()
            torch.cuda.empty_cache()

    def _views(self, flat: torch.Tensor):
        n = 2 * self.F * self.H
        return flat[:n].view(2 * self.F, self.H), flat[n:].view(self.H, self.F)

    # ----------------------------------------------------------------- one MoE layer
    def _run_layer(self, l, hidden, top_k_index, top_k_weights, act_fn):
        """One MoE layer: the router's choice comes to the host (the layer's one sync), the
        (token, choice) pairs are grouped by expert on the host (one stable argsort) and sent
        to the GPU in one copy; each planned compute then reads a contiguous run of them, so no
        compute waits on the host or copies anything."""
        ex = self._executed
        own = top_k_index.to("cpu").numpy()  # the router's choice comes to the host, as a runtime's must
        forced = self.trace.step(self._step)[:, l, :]
        if forced.shape != own.shape:
            raise ValueError(f"trace step {self._step} routes {tuple(forced.shape)}, the model {tuple(own.shape)}")
        ex["router_agrees"] += int(np.array_equal(np.sort(forced, axis=-1), np.sort(own, axis=-1)))
        k = forced.shape[1]
        flat = forced.reshape(-1).astype(np.int64)
        order = np.argsort(flat, kind="stable")  # by expert; within one, token-major (the load modes' order)
        counts = np.bincount(flat, minlength=self.E)
        nxt = np.concatenate([[0], np.cumsum(counts)[:-1]])  # next unserved pair of each expert, in ``order``
        end = nxt + counts
        if self.grouped:   # each grouped call sends its own pairs (_grouped_window)
            ops, tok, w = group_layer(self._ops[l]), None, None
        else:
            ops = self._ops[l]
            order_dev = self._to_device(order)
            tok = order_dev // k                              # the pair's token
            w = top_k_weights.reshape(-1)[order_dev]          # its routing weight
        out = torch.zeros_like(hidden)
        on_host = None
        if any(op[0] == CPU for op in ops):   # the layer's input and weights come down once, now
            t_down = time.perf_counter()
            on_host = (hidden.to("cpu"), top_k_weights.reshape(-1).to("cpu"))   # (the GPU is idle: just synced)
            ex["cpu_down_us"] += (time.perf_counter() - t_down) * 1e6
        for op in ops:
            kind = op[0]
            if kind == GROUP:
                runs = [(c[1], *self._take(nxt, end, c[2] % self.E, c[3])) for c in op[2]]
                runs = [r for r in runs if r[2] > r[1]]
                if runs:   # the call's indices go up before it waits for its copies (_grouped_indices)
                    if self.upload_first:
                        windows = self._grouped_indices(runs, order, k)
                        self._wait_loads(op[1])
                    else:
                        self._wait_loads(op[1])
                        windows = self._grouped_indices(runs, order, k)
                    self._grouped_ffn(out, hidden, windows, top_k_weights, act_fn)
                    self._mark_read(*op[1])
                ex["computes"] += len(runs)
                ex["computed_tokens"] += sum(b - a for _, a, b in runs)
            elif kind == DENSE:
                ex["denses"] += 1
            elif kind == LOAD:
                self._load(op[1], op[2])
                ex["copies"] += 1
                ex["transfers"] += len(op[2])
                ex["prefetch_copies"] += int(op[4])
            elif kind == COMPUTE:
                a, b = self._take(nxt, end, op[2] % self.E, op[3])
                if b > a:
                    self._wait_load(op[1])
                    self._ffn(out, hidden, tok[a:b], w[a:b], self._slot_views(op[1]), act_fn)
                    self._mark_read(op[1])
                ex["computes"] += int(b > a)
                ex["computed_tokens"] += b - a
            elif kind == DEQUANT:
                self._dequant(op[1])
                ex["dequants"] += 1
            elif kind == DIRECT:
                a, b = self._take(nxt, end, op[1] % self.E, op[2])
                self._direct(out, hidden, order[a:b], k, top_k_weights, self.host[op[1] // self.E][op[1] % self.E],
                             act_fn)
                ex["direct_computes"] += 1
                ex["computed_tokens"] += b - a
            elif kind == CPU:
                a, b = self._take(nxt, end, op[1] % self.E, op[2])
                t_cpu = time.perf_counter()
                self._cpu(out, on_host, order[a:b] // k, order[a:b], self.host[l][op[1] % self.E], act_fn)
                ex["cpu_us"] += (time.perf_counter() - t_cpu) * 1e6     # host time of the CPU expert
                ex["cpu_computes"] += 1
                ex["computed_tokens"] += b - a
        left = int((end - nxt).sum())
        if left:
            raise RuntimeError(f"step {self._step} layer {l}: {left} routed (token, expert) pair(s) not served")
        return out

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host index array on the device: from a pinned buffer, asynchronously (on CUDA)."""
        t = torch.from_numpy(a)
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def _take(nxt: np.ndarray, end: np.ndarray, e: int, tokens: int) -> tuple[int, int]:
        a = int(nxt[e])
        if a + tokens > end[e]:
            raise RuntimeError(f"expert {e}: a compute of {tokens} token(s), {int(end[e]) - a} routed left")
        nxt[e] = a + tokens
        return a, a + tokens

    def _slot_views(self, slot: int):
        return self._views(self.pool[slot])

    def _wait_load(self, slot: int) -> None:
        """The compute stream waits for the last copy into ``slot`` (CUDA)."""
        ev = self.last_load.get(slot) if self.cuda else None
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def _wait_loads(self, slots) -> None:
        """The compute stream waits for the last copies into ``slots``: each copy's event once
        (the slots of one batched copy share it)."""
        if not self.cuda:
            return
        last = self.last_load
        events = {id(ev): ev for ev in (last.get(sl) for sl in slots) if ev is not None}
        stream = torch.cuda.current_stream(self.device)
        for ev in events.values():
            stream.wait_event(ev)

    def _mark_read(self, *slots: int) -> None:
        """The next copy into each of ``slots`` waits for this compute (CUDA): one event
        recorded after it (a grouped call reads all its slots), shared by the slots."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            for sl in slots:
                self.last_read[sl] = done

    def _load(self, slots, keys) -> None:
        """One copy operation: each key's host bytes into its slot (a quantised expert's into the
        slot's staging buffer), after the last compute (or dequantise) that read the slot."""
        ex = self._executed
        src_of, dst = (self.host, self.pool) if not self.quant else (self.host_q, self.stage)
        if not self.cuda:
            for sl, k in zip(slots, keys):
                src = src_of[k // self.E][k % self.E]
                dst[sl].copy_(src)
                ex["bytes_h2d"] += src.numel() * src.element_size()
            return
        with torch.cuda.stream(self.copy_stream):
            for sl in slots:
                ev = self.last_read.get(sl)
                if ev is not None:
                    self.copy_stream.wait_event(ev)
            for sl, k in zip(slots, keys):
                src = src_of[k // self.E][k % self.E]
                dst[sl].copy_(src, non_blocking=True)
                ex["bytes_h2d"] += src.numel() * src.element_size()
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        for sl in slots:
            self.last_load[sl] = done

    def _direct(self, out, hidden, pairs: np.ndarray, k: int, weights, host_flat, act_fn) -> None:
        """The FFN of one expert on the GPU over its host weights (``host_flat``, pinned: mapped
        into the GPU's address space, read over PCIe by the kernels) for the (token, choice)
        pairs ``pairs``; on a CPU device the host weights as they are."""
        if self.cuda:
            view = self._mapped.get(host_flat.data_ptr())
            if view is None:
                view = self._mapped[host_flat.data_ptr()] = mapped_view(host_flat, self.device)
            host_flat = view
        sel = self._to_device(pairs)
        self._ffn(out, hidden, sel // k, weights.reshape(-1)[sel], self._views(host_flat), act_fn)

    def _dequant(self, slot: int) -> None:
        """The slot's staged quantised bytes dequantised into the slot, on the compute stream
        after their copy; the next copy into the staging buffer waits for it (CUDA)."""
        self._wait_load(slot)
        dequantise(self.stage[slot], self.quant, self.pool[slot])
        self._mark_read(slot)

    @staticmethod
    def _ffn(out, hidden, tok, w, views, act_fn):
        """transformers' expert math on the tokens ``tok`` (their routing weights ``w``),
        added into ``out`` (a token meets an expert once)."""
        gate_up, down = views
        gate, up = torch.nn.functional.linear(hidden.index_select(0, tok), gate_up).chunk(2, dim=-1)
        y = torch.nn.functional.linear(act_fn(gate) * up, down) * w[:, None]
        out.index_add_(0, tok, y.to(out.dtype))

    def _grouped_indices(self, runs, order: np.ndarray, k: int) -> list[tuple]:
        """A grouped call's index buffers on the device, one copy per window of the slot pool:
        ``runs`` = (slot, a, b), the pairs ``order[a:b]`` served from ``slot``; per window
        [first slot, last slot] (slots between: empty groups) one host buffer [the cumulative
        rows per slot | the pairs | their tokens], rows sorted by slot, as transformers'
        grouped_mm experts have them. torch's kernel takes at most ``GROUPED_MAX`` groups, so
        runs spread wider than that take one window each (rare: a layer's experts span the
        pool only in caches of over a thousand slots).

        They are sent before the compute stream waits for the call's copies: a copy queued on
        the compute stream behind that wait becomes ready when the copies it waits for end,
        the moment the copy stream's next queued copies (the next layer's prefetch) do too,
        and a copy engine that takes them in queue order holds the small copy, and the layer,
        behind the whole prefetch (bench/probe_copy_fifo.py)."""
        runs = sorted(runs)
        windows, start = [], 0
        for i in range(1, len(runs) + 1):
            if i == len(runs) or runs[i][0] - runs[start][0] >= GROUPED_MAX:
                part = runs[start:i]
                lo, hi = part[0][0], part[-1][0] + 1
                n = hi - lo
                sel = np.concatenate([order[a:b] for _, a, b in part])
                m = len(sel)
                idx = np.zeros(n + 2 * m, np.int32)
                for slot, a, b in part:
                    idx[slot - lo] += b - a
                np.cumsum(idx[:n], out=idx[:n])
                idx[n:n + m] = sel
                idx[n + m:] = sel // k
                windows.append((lo, hi, n, m, self._to_device(idx)))
                start = i
        return windows

    def _grouped_ffn(self, out, hidden, windows, weights, act_fn):
        """One grouped GEMM pair per window (:meth:`_grouped_indices`) over its slots."""
        F, H = self.F, self.H
        for lo, hi, n, m, idx_dev in windows:
            offs, sel_dev, tok = idx_dev[:n], idx_dev[n:n + m], idx_dev[n + m:]
            w = weights.reshape(-1).index_select(0, sel_dev)
            gate_up = self.pool[lo:hi, :2 * F * H].view(n, 2 * F, H).transpose(-2, -1)   # (slots, H, 2F)
            down = self.pool[lo:hi, 2 * F * H:].view(n, H, F).transpose(-2, -1)          # (slots, F, H)
            x = hidden.index_select(0, tok).to(self.dtype)
            gate, up = grouped_mm(x, gate_up, offs).chunk(2, dim=-1)
            y = grouped_mm((act_fn(gate) * up).to(self.dtype), down, offs) * w[:, None]
            out.index_add_(0, tok, y.to(out.dtype))

    def _cpu(self, out, on_host, tok: np.ndarray, pairs: np.ndarray, host_flat, act_fn):
        """The FFN on the host weights for the tokens ``tok`` (their pairs ``pairs``), from the
        layer's activations and routing weights on the host (``on_host``, copied down once per
        layer when the router's choice came up, while the GPU was idle); the result goes up
        from pinned memory without a wait, and is added in on the compute stream. Nothing here
        waits for the GPU's queue: the hits' computes issued before it run meanwhile, as the
        simulator has it."""
        h, w = on_host
        idx = torch.from_numpy(tok)
        gate_up, down = self._views(host_flat)
        gate, up = torch.nn.functional.linear(h.index_select(0, idx), gate_up).chunk(2, dim=-1)
        y = torch.nn.functional.linear(act_fn(gate) * up, down) * w[torch.from_numpy(pairs)][:, None]
        y = y.to(out.dtype)
        if not self.cuda:
            out.index_add_(0, idx, y)
            return
        up_y = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)   # the caching host allocator's
        up_y.copy_(y)
        out.index_add_(0, self._to_device(tok), up_y.to(out.device, non_blocking=True))

    # ----------------------------------------------------------------------- steps
    def start(self) -> None:
        """Prefill the prompt with every routed expert computed on the GPU from host weights
        (outside the plan: the trace's steps are decode steps)."""
        from transformers import DynamicCache
        P = self.prompt.shape[1]
        if self.graphs is None:
            self.cache = DynamicCache()
        else:   # a static cache of the prompt and every decode step (calibrate/executors/graphs.py)
            from calibrate.executors.graphs import static_cache
            self.cache = static_cache(self.b, graphed_cache_len(P + self.trace.num_steps))
        saved = [blk.experts for blk in self.b.moe_blocks()]
        for blk, l in zip(self.b.moe_blocks(), range(len(saved))):
            blk.experts = _HostExperts(self, l, saved[l].act_fn)
        with torch.no_grad():
            prefill(self.b.model, self.prompt, self.cache)
        for blk, mod in zip(self.b.moe_blocks(), saved):
            blk.experts = mod
        if self.graphs is not None:   # the pieces around the offloaded experts, captured once
            from calibrate.executors.graphs import GraphedLayers
            self.graphs = GraphedLayers(self.b)
            self.graphs.capture(self.prompt.shape[0], graphed_cache_len(P + self.trace.num_steps), self.cache,
                                position=P)

    def prepare_step(self, s: int):
        """Plan step ``s`` and zero its counters (the MoE layers then execute the plan);
        returns the planner's Decisions."""
        self._ops, decisions = self.planner.plan_step(s)
        self._step = s
        self._executed = dict.fromkeys(("transfers", "copies", "bytes_h2d", "cpu_computes", "computes",
                                        "computed_tokens", "prefetch_copies", "denses", "router_agrees",
                                        "cpu_us", "cpu_down_us", "dequants", "direct_computes"), 0)
        return decisions

    def run_step(self, s: int):
        """One decode step; returns (ModelStep, the planner's Decisions)."""
        if self.cache is None:
            self.start()
        decisions = self.prepare_step(s)
        probe = None
        if self.probe:
            from calibrate.measurements.host_speed import host_probe
            probe = host_probe(self.device)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        gate = host_state.gate()   # with --host-state fast: start in the host's fast state
        if gate is not None:
            gate.wait()
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.graphs:
                logits = self.graphs.run(self.next_ids[s], self.prompt.shape[1] + s)
            else:
                logits = self.b.model(input_ids=self.next_ids[s], past_key_values=self.cache, use_cache=True).logits
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            torch.cuda.synchronize(self.device)
        latency = (time.perf_counter() - t0) * 1e3
        self.last_logits = logits if not self.graphs else logits.clone()   # graphs: a static buffer
        st = ModelStep(step=s, latency_ms=latency, executed=dict(self._executed))
        st.probe = probe
        st.host_fast = gate.check() if gate is not None else None   # did it end in the fast state?
        return st, decisions

    def run(self, steps: range | None = None):
        steps = range(self.trace.num_steps) if steps is None else steps
        return [self.run_step(s) for s in steps]


GROUPED_MAX = 1024   # groups one torch._grouped_mm call takes (its CUDA kernel's limit)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` (rows sorted by group) times each group's ``w[g]`` (groups, in, out), ``offs`` the
    cumulative rows: torch's grouped GEMM (``torch.nn.functional.grouped_mm`` or
    ``torch._grouped_mm``)."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def host_experts(built: BuiltModel, pinned: bool) -> list[list[torch.Tensor]]:
    """Every routed expert's weights (``gate_up_proj[e]`` then ``down_proj[e]``, flat) in host
    memory, pinned or pageable: ``[layer][expert]``. Needs the model's own experts modules."""
    out = []
    for blk in built.moe_blocks():
        experts = blk.experts
        if not hasattr(experts, "gate_up_proj"):
            raise ValueError("the model's experts are already offloaded; pass the host experts of the first run")
        layer = []
        for e in range(experts.gate_up_proj.shape[0]):
            flat = torch.cat([experts.gate_up_proj[e].reshape(-1), experts.down_proj[e].reshape(-1)])
            t = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=pinned)
            t.copy_(flat)  # straight from the device into pinned memory: no pageable bounce
            layer.append(t)
        out.append(layer)
    return out


def quantised_host(host: list[list[torch.Tensor]], dtype: str, pinned: bool, device) -> list[list[torch.Tensor]]:
    """Every expert of ``host`` (flat weights, ``[layer][expert]``) quantised to ``dtype`` as
    simmoe stores it below the GPU (:func:`calibrate.executors.quant.quantise`; on ``device``,
    then back to host memory, pinned or pageable): ``[layer][expert]`` of uint8."""
    out = []
    for layer in host:
        row = []
        for flat in layer:
            q = quantise(flat.to(device), dtype)
            t = torch.empty(q.numel(), dtype=torch.uint8, pin_memory=pinned)
            t.copy_(q)
            row.append(t)
        out.append(row)
    return out


class _HostExperts(torch.nn.Module):
    """The prompt's experts: every routed expert computed from its host weights (no plan)."""

    def __init__(self, ex: ModelExecutor, layer: int, act_fn):
        super().__init__()
        self.ex, self.layer, self.act_fn = ex, layer, act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        w = top_k_weights.reshape(-1)
        for e in torch.unique(flat).tolist():
            pairs = (flat == e).nonzero().squeeze(1)
            views = self.ex._views(self.ex.host[self.layer][e].to(hidden_states.device))
            self.ex._ffn(out, hidden_states, pairs // k, w[pairs], views, self.act_fn)
        return out


def graphed_cache_len(tokens: int) -> int:
    """The static cache's length for ``tokens`` (prompt + steps) in the graphed dispatch: one
    more (masked, never written) when ``tokens`` is a multiple of 8. On the H200 the one capture
    that failed (cudaErrorStreamCaptureInvalidated) was over 264 keys, while 129-4,033, 266 and
    268 captured: every length that captured was not a multiple of 8, where attention may take
    another kernel (tests/test_graphs.py's length test checks this on a GPU)."""
    return tokens + 1 if tokens % 8 == 0 else tokens


#: prompt tokens (batch x chunk) one prefill forward takes: a long prompt at a large batch is
#: prefilled in chunks of positions, as an engine's chunked prefill does (OLMoE at B=64 and
#: 4,000 tokens in one forward asked for 24 GiB of logits alone)
PREFILL_CHUNK_TOKENS = 16_384


def prefill(model, ids: torch.Tensor, cache, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> None:
    """Run the prompt ``ids`` (batch x tokens) into ``cache``: chunks of positions of at most
    ``chunk_tokens`` tokens over the batch (at least 16 positions each), the LM head on each
    chunk's last position only (its logits are not used)."""
    B, P = ids.shape
    step = max(16, chunk_tokens // max(B, 1))
    for a in range(0, P, step):
        b = min(P, a + step)
        model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True, logits_to_keep=1,
              cache_position=torch.arange(a, b, device=ids.device))


def decode_inputs(vocab: int, batch: int, steps: int, prompt_tokens: int, seed: int, device) -> tuple:
    """The prompt (batch x prompt_tokens) and each decode step's input ids (steps x batch x 1)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=gen).to(device)
    return prompt, torch.randint(0, vocab, (steps, batch, 1), generator=gen).to(device)


def record_routing(built: BuiltModel, *, batch: int, steps: int, prompt_tokens: int = 4, seed: int = 0,
                   device: str = "cpu") -> Trace:
    """A decode trace from the model's own router, every expert resident: the inputs the
    executor feeds with the same seed, each MoE layer's top-k of each decode step recorded."""
    from transformers import DynamicCache

    prompt, next_ids = decode_inputs(built.arch.vocab, batch, steps, prompt_tokens, seed, device)
    seen: list[list] = []
    hooks = [blk.gate.register_forward_hook(lambda mod, args, out, l=l: seen[-1].__setitem__(l, out[2].cpu()))
             for l, blk in enumerate(built.moe_blocks())]
    L = len(hooks)
    try:
        cache = DynamicCache()
        with torch.no_grad():
            seen.append([None] * L)
            prefill(built.model, prompt, cache)
            seen.clear()
            for s in range(steps):
                seen.append([None] * L)
                built.model(input_ids=next_ids[s], past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    experts = np.stack([np.stack([x.numpy() for x in step], axis=1) for step in seen]).reshape(steps * batch, L, -1)
    return Trace(experts=experts.astype(np.int16), step_offsets=np.arange(steps + 1, dtype=np.int64) * batch,
                 seq=np.tile(np.arange(batch, dtype=np.int32), steps), phase=np.zeros(steps, np.uint8),
                 num_experts=built.spec.num_experts, meta={"source": "recorded from the model's own router"})
