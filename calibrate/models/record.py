"""Record the expert routing of a local Hugging Face MoE checkpoint.

Forward hooks on the router of every MoE layer capture which experts each token picks, as the
model itself picks them (group-limited routing, biases and all), while the model runs each
prompt (teacher-forced) and optionally greedy-generates after it. Routers are recognised by
their output: a tuple holding an integer ``(tokens, top_k)`` tensor (transformers 4.5x-5.x
``*TopKRouter``/``*TopkRouter``, DeepSeek ``MoEGate``), or, for a plain ``gate`` linear layer
of a sparse-MoE block (older Mixtral/Qwen-MoE code), the ``(tokens, num_experts)`` logits, of
which the top-k are taken. Tested offline on tiny randomly initialised Mixtral, OLMoE,
Qwen2-MoE and DeepSeek-V2/V3 configs.

Needs the optional extra (``pip install 'simmoe[record]'``: torch and transformers), imported
only when recording. Nothing is downloaded: the checkpoint must be a local folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from simulator.errors import InputError
from simulator.traces.real import SequenceSet, SequenceWriter, load_sequences
from simulator.traces.trace import expert_dtype

_EXPERTS_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _import_backends():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise InputError("trace record", "dependencies",
                         f"{e.name} is not installed: pip install 'simmoe[record]' (torch and transformers)") from None
    return torch, transformers


def _config_int(config, keys: tuple[str, ...], what: str, source: str) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise InputError(source, "config.json", f"no {what} (looked for {', '.join(keys)}): not an MoE model?")


def _is_router(name: str, module, num_experts: int) -> bool:
    """A router of a sparse-MoE layer: a ``*Router`` / ``MoEGate`` module, or a ``gate``
    linear layer with one output per expert."""
    if re.search(r"(Router|MoEGate)$", type(module).__name__):
        return True
    return name.endswith(".gate") and getattr(module, "out_features", None) == num_experts


def _routed_ids(output, num_experts: int, top_k: int):
    """The ``(tokens, top_k)`` expert ids from a router's output."""
    import torch

    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in reversed(items):
        if isinstance(item, torch.Tensor) and not item.is_floating_point() and item.shape[-1] == top_k:
            return item.reshape(-1, top_k)
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.shape[-1] == num_experts:
            return torch.topk(item.reshape(-1, num_experts).float(), top_k, dim=-1).indices
    return None


class RouterRecorder:
    """Hooks on every MoE router of a model; collects each layer's routed ids per forward."""

    def __init__(self, model, num_experts: int, top_k: int, source: str):
        self.num_experts, self.top_k, self.source = num_experts, top_k, source
        self.calls: dict[int, list[np.ndarray]] = {}
        routers = [(int(m.group(1)), name, module) for name, module in model.named_modules()
                   if (m := _LAYER.search(name)) and _is_router(name, module, num_experts)]
        if not routers:
            raise InputError(source, "model", "found no MoE router modules to record")
        self.layers = sorted({layer for layer, _, _ in routers})
        if len(self.layers) != len(routers):
            raise InputError(source, "model", "found more than one router in a layer: "
                                              + ", ".join(name for _, name, _ in routers))
        self.handles = [module.register_forward_hook(self._hook(layer, name)) for layer, name, module in routers]

    def _hook(self, layer: int, name: str):
        def hook(module, inputs, output):
            ids = _routed_ids(output, self.num_experts, self.top_k)
            if ids is None:
                raise InputError(self.source, name, "router output holds no expert ids or logits")
            self.calls.setdefault(layer, []).append(ids.detach().cpu().numpy().astype(expert_dtype(self.num_experts)))
        return hook

    def take(self) -> np.ndarray:
        """Routing ``(tokens, layers, top_k)`` collected since the last take."""
        per_layer = [np.concatenate(self.calls.get(layer, [np.zeros((0, self.top_k), expert_dtype(self.num_experts))]))
                     for layer in self.layers]
        self.calls = {}
        lengths = {len(x) for x in per_layer}
        if len(lengths) != 1:
            raise InputError(self.source, "model", f"MoE layers routed different token counts: {sorted(lengths)}")
        return np.stack(per_layer, axis=1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _prompts(path: Path | None, random_sequences: int | None, length: int, vocab: int, seed: int, tokenizer_of):
    """Token id lists: from a prompts file (text lines, or JSON lines with text / input_ids),
    or seeded random ids."""
    if path is None:
        rng = np.random.Generator(np.random.PCG64(seed))
        return [(f"random_{i}", rng.integers(0, vocab, size=length).tolist()) for i in range(random_sequences)]
    if not path.exists():
        raise InputError(str(path), "--prompts", "file not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        text = line
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(str(path), f"line {n}", f"malformed JSON: {e.msg}") from None
            if isinstance(rec, dict) and isinstance(rec.get("input_ids"), list):
                ids = rec["input_ids"]
                if not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
                    raise InputError(str(path), f"line {n}", f"input_ids must be token ids in [0, {vocab})")
                out.append((f"prompt_{n}", ids))
                continue
            if not (isinstance(rec, dict) and isinstance(rec.get("text"), str)):
                raise InputError(str(path), f"line {n}", "each JSON line needs 'text' or 'input_ids'")
            text = rec["text"]
        out.append((f"prompt_{n}", tokenizer_of()(text)["input_ids"]))
    if not out:
        raise InputError(str(path), "--prompts", "no prompts")
    return out


def record_routing(model_path: str | Path, out: str | Path, *, prompts: str | Path | None = None,
                   random_sequences: int | None = None, length: int = 32, max_new_tokens: int = 0,
                   device: str = "cpu", seed: int = 0) -> SequenceSet:
    """Run each prompt through the checkpoint at ``model_path`` and write every token's routing
    (prompt tokens, then generated ones) to ``out`` as a ``simmoe-sequences`` .npz."""
    torch, transformers = _import_backends()
    src = str(model_path)
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise InputError(src, "--model", "not a local Hugging Face checkpoint folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise InputError(src, "--model", f"cannot load: {e}") from None
    num_experts = _config_int(config, _EXPERTS_KEYS, "number of routed experts", src)
    top_k = _config_int(config, _TOP_K_KEYS, "experts per token", src)

    def tokenizer():
        try:
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise InputError(src, "tokenizer", f"no usable tokenizer ({e}); give input_ids in JSON lines "
                                               "or use --random") from None

    seqs = _prompts(Path(prompts) if prompts else None, random_sequences, length, config.vocab_size, seed, tokenizer)
    torch.manual_seed(seed)
    rec = RouterRecorder(model, num_experts, top_k, src)
    meta = {"model": src, "model_type": getattr(config, "model_type", ""), "moe_layers": rec.layers,
            "max_new_tokens": max_new_tokens, "seed": seed, "transformers": transformers.__version__}
    try:
        with SequenceWriter(out, num_experts=num_experts, meta=meta) as w, torch.no_grad():
            for name, ids in seqs:
                x = torch.tensor([ids], device=device)
                if max_new_tokens:
                    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=config.vocab_size - 1)
                else:
                    model(x)
                w.add(rec.take(), name, prompt_length=len(ids))
    finally:
        rec.remove()
    return load_sequences(out)
