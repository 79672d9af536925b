"""Fused multi-LoRA serving (routing/lora) checked against peft on a tiny random Llama, float32.

Every adapter is a real peft directory (get_peft_model + random lora_B + save_pretrained), so the
loader is tested on what training/ writes, and every fused result is compared with peft running
that adapter alone (or with the explicit Semantics loop for the layer).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from routing.lora import (AdapterLoadError, AdapterStore, CapacityError, FusedLoraLinear, FusedLoraModel,
                          RoutingState, TorchReferenceBackend, generate)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TOL = 1e-4
CORPUS = ["the quick brown fox jumps over the lazy dog. " * 3, "Question: what is two plus two? Answer: four.",
          "translate to french: hello world; bonjour le monde! 0123456789"]
PROMPTS = ["the quick brown", "Question: what is", "hello", "translate to french: the lazy dog"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over ASCII text (no hub access): every token decodes to ASCII."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>"],
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.padding_side = "left"
    return fast


def make_base(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def randomise(peft_model, seed: int, std: float = 0.2) -> None:
    """Stand-in for training: lora_B (zero at init) and a nudge to lora_A, so deltas are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_A" in name:
                p.add_(torch.randn(p.shape, generator=g) * std / 4)


def make_adapter(base, out_dir, seed: int, **cfg):
    """Save a randomised peft LoRA to out_dir; returns the peft model (on a copy of base)."""
    cfg.setdefault("target_modules", ATTN + MLP)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    randomise(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model.eval()


def make_pissa_adapter(base, root, seed: int):
    """PiSSA trained on its residual base, converted to a plain LoRA for the original base."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + MLP,
                                                          init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True  # peft docs: save the untrained init as plain
    model.save_pretrained(root / "pissa_init", safe_serialization=True)
    randomise(model, seed, std=0.05)  # "training" moves A and B away from the init
    model.save_pretrained(root / "pissa", safe_serialization=True,
                          path_initial_model_for_weight_conversion=str(root / "pissa_init"))
    return model.eval()


# name -> LoraConfig kwargs: the K=1 table. All are loaded side by side into one fused model.
CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True),
    "rank8_alpha32": dict(r=8, lora_alpha=32),
    "rank2_mlp_only": dict(r=2, lora_alpha=3, target_modules=MLP),
    "qv_only": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rank_alpha_pattern": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                               alpha_pattern={"v_proj": 2}),
    "layer1_only": dict(r=3, lora_alpha=5, layers_to_transform=[1]),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster and immune to OpenMP spin-waits on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def case_adapters(base, root) -> tuple[dict, dict]:
    """Every CASES adapter saved under `root`: (peft models, paths), by case name."""
    peft_models, paths = {}, {}
    for i, (name, cfg) in enumerate(CASES.items()):
        paths[name] = root / name
        peft_models[name] = make_adapter(base, paths[name], seed=100 + i, **cfg)
    return peft_models, paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, base model, every CASES adapter + PiSSA saved, their peft models, a fused model."""
    root = tmp_path_factory.mktemp("adapters")
    tok = make_tokenizer()
    base = make_base(len(tok))
    peft_models, paths = case_adapters(base, root)
    peft_models["pissa"] = make_pissa_adapter(base, root, seed=7)
    paths["pissa"] = root / "pissa"
    fused = FusedLoraModel(copy.deepcopy(base), max_loras=len(paths), max_rank=8)
    for name, p in paths.items():
        fused.load_adapter(name, p)
    return dict(root=root, tok=tok, base=base, peft=peft_models, paths=paths, fused=fused)


def tokens(n_rows: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n_rows, length), generator=torch.Generator().manual_seed(seed))


# ---- the fused layer against the Semantics loop ---------------------------------------------------

def semantics_loop(x, base, adapters, indices, weights):
    """LoraBackend.add_lora's docstring, literally, on the unpadded adapters (A_i (r_i, in), B_i, s_i)."""
    y = base(x).clone()
    for b in range(x.shape[0]):
        for k in range(indices.shape[1]):
            i = int(indices[b, k])
            if i >= 0:
                a, bb, s = adapters[i]
                y[b] += weights[b, k] * s * (x[b] @ a.T) @ bb.T
    return y


@pytest.mark.parametrize("tokens_per_row", [1, 6])
@pytest.mark.parametrize("num_loras", [1, 4, 9])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_layer_matches_semantics_loop(rank, batch, k, num_loras, tokens_per_row):
    g = torch.Generator().manual_seed(rank * 1000 + batch * 100 + k * 10 + num_loras)
    d_in, d_out, max_rank = 24, 40, 8
    base = torch.nn.Linear(d_in, d_out)
    state = RoutingState()
    layer = FusedLoraLinear(base, max_loras=num_loras, max_rank=max_rank, routing=state,
                            backend=TorchReferenceBackend())
    adapters = []
    for i in range(num_loras):
        r = max(1, rank - i % 3)  # mixed ranks, all zero-padded to max_rank
        a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        s = float(torch.rand((), generator=g) * 4)
        layer.set_slot(i, a, b, s)
        adapters.append((a, b, s))
    indices = torch.randint(-1, num_loras, (batch, k), generator=g)  # -1 = padding / no adapter
    indices[0] = -1  # row 0 is a bare-base row
    weights = torch.randn(batch, k, generator=g)  # used as given, not normalised
    x = torch.randn(batch, tokens_per_row, d_in, generator=g)
    state.set(indices, weights)
    with torch.no_grad():
        got = layer(x)
        want = semantics_loop(x, base, adapters, indices, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], base(x)[0], atol=0, rtol=0)  # base row: bit-exact
    state.set(None, None)  # no routing: the bare base layer
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def test_backend_add_lora_directly():
    g = torch.Generator().manual_seed(0)
    a_stack, b_stack = torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 4, generator=g)
    scale = torch.tensor([0.5, 2.0, 1.0])
    indices, weights = torch.tensor([[2, 0], [-1, -1], [1, -1]]), torch.tensor([[0.7, 0.3], [1.0, 1.0], [1.5, 9.0]])
    x = torch.randn(3, 2, 8, generator=g)
    y = TorchReferenceBackend().add_lora(torch.zeros(3, 2, 6), x, a_stack, b_stack, scale, indices, weights)
    want = torch.zeros(3, 2, 6)
    for b in range(3):
        for k in range(2):
            i = int(indices[b, k])
            if i >= 0:
                want[b] += weights[b, k] * scale[i] * (x[b] @ a_stack[i].T) @ b_stack[i].T
    torch.testing.assert_close(y, want)


def test_clear_slot_and_smaller_rank_reuse():
    layer = FusedLoraLinear(torch.nn.Linear(8, 8), 1, 4, RoutingState())
    layer.set_slot(0, torch.randn(4, 8), torch.randn(8, 4), 1.0)
    layer.set_slot(0, torch.ones(1, 8), torch.ones(8, 1), 1.0)  # rank 1 into a slot that held rank 4
    assert layer.lora_a[0, 1:].abs().sum() == 0 and layer.lora_b[0, :, 1:].abs().sum() == 0
    layer.clear_slot(0)
    assert layer.lora_a.abs().sum() == 0 and layer.lora_scale.abs().sum() == 0
    with pytest.raises(ValueError, match="max_rank"):
        layer.set_slot(0, torch.randn(5, 8), torch.randn(8, 5), 1.0)


# ---- the fused model against peft -----------------------------------------------------------------

@pytest.mark.parametrize("name", [*CASES, "pissa"])
def test_k1_logits_match_peft(world, name):
    ids = tokens(3, 7, len(world["tok"]), seed=1)
    with torch.no_grad():
        want = world["peft"][name](input_ids=ids).logits
        with world["fused"].routing([[(name, 1.0)]] * 3):
            got = world["fused"](input_ids=ids).logits
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{name}: max abs diff {diff}"
    with torch.no_grad():
        base = world["base"](input_ids=ids).logits
    assert (want - base).abs().max().item() > 100 * TOL, f"{name}: the adapter changes nothing, test is vacuous"


def test_pissa_converted_config(world):
    cfg = json.loads((world["paths"]["pissa"] / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # r doubled by the conversion


def test_mixed_batch_equals_each_row_alone(world):
    names = ["plain", "qv_only", None, "rslora", "pissa", "plain"]
    ids = tokens(len(names), 9, len(world["tok"]), seed=2)
    rows = [[(n, 1.0)] if n else [] for n in names]
    with torch.no_grad():
        with world["fused"].routing(rows):
            got = world["fused"](input_ids=ids).logits
        for b, n in enumerate(names):
            alone = (world["peft"][n] if n else world["base"])(input_ids=ids[b:b + 1]).logits[0]
            assert (got[b] - alone).abs().max().item() <= TOL, f"row {b} ({n})"
        assert world["fused"].routing_state.indices is None  # the context restored "no routing"
        torch.testing.assert_close(world["fused"](input_ids=ids).logits, world["base"](input_ids=ids).logits)


def test_k_way_fusion_is_weighted_sum_of_deltas(world):
    """Logits are not linear in the deltas, so check the first fused layer's output directly."""
    fused, rows = world["fused"], [[("plain", 0.5), ("rslora", 0.3), ("qv_only", 0.2)], [("pissa", 2.0)], []]
    layer = fused.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad(), fused.routing(rows):
        got = layer(x)
    want = layer.base(x).detach().clone()
    for b, row in enumerate(rows):
        for name, w in row:
            s = fused.slots[name]
            want[b] += w * layer.lora_scale[s] * (x[b] @ layer.lora_a[s].T) @ layer.lora_b[s].T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_uncached_gather_matches_cached(world):
    ids = tokens(2, 5, len(world["tok"]), seed=4)
    rows = [[("plain", 0.6), ("pissa", 0.4)], [("qv_only", 1.0)]]
    fused = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=3, max_rank=8, cache_prepared=False)
    for name in ("plain", "pissa", "qv_only"):
        fused.load_adapter(name, world["paths"][name])
    with torch.no_grad():
        with fused.routing(rows):
            got = fused(input_ids=ids).logits
        with world["fused"].routing(rows):
            want = world["fused"](input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_routing_errors(world):
    with pytest.raises(KeyError, match="not loaded"):
        with world["fused"].routing([[("nope", 1.0)]]):
            pass
    with pytest.raises(RuntimeError, match="rows"):
        with torch.no_grad(), world["fused"].routing([[("plain", 1.0)]]):
            world["fused"](input_ids=tokens(2, 3, 50))


# ---- refusals -------------------------------------------------------------------------------------

def _dora(base, d):
    make_adapter(base, d, 1, r=4, lora_alpha=8, use_dora=True)


def _bin(base, d):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=ATTN))
    model.save_pretrained(d, safe_serialization=False)


def _big_rank(base, d):
    make_adapter(base, d, 1, r=16, lora_alpha=16)


def _fan_in_fan_out(base, d):
    make_adapter(base, d, 1, r=4)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))


def _unconverted_pissa(base, d):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=ATTN, init_lora_weights="pissa"))
    model.save_pretrained(d, safe_serialization=True)


def _lm_head(base, d):
    make_adapter(base, d, 1, r=4, target_modules=["q_proj", "lm_head"])


@pytest.mark.parametrize("build, message", [
    (_dora, "DoRA.*per-adapter magnitude"),
    (_bin, r"adapter_model\.bin.*pickle"),
    (_big_rank, "rank 16 > max_rank 8"),
    (_fan_in_fan_out, "fan_in_fan_out"),
    (_unconverted_pissa, "pissa.*path_initial_model_for_weight_conversion"),
    (_lm_head, "lm_head"),
], ids=["dora", "bin", "rank", "fan_in_fan_out", "unconverted_pissa", "lm_head"])
def test_refused_adapters(world, tmp_path, build, message):
    d = tmp_path / f"bad-{build.__name__}"
    build(world["base"], d)
    fused = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=2, max_rank=8)
    with pytest.raises(AdapterLoadError, match=message) as err:
        fused.load_adapter("my-bad-adapter", d)
    assert "my-bad-adapter" in str(err.value)
    assert isinstance(err.value, ValueError) and fused.slots == {}
    assert all(layer.lora_a.abs().sum() == 0 for layer in fused.layers.values())  # nothing written


def test_load_errors_slots_full_and_duplicate(world):
    fused = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=1, max_rank=8)
    assert fused.load_adapter("a", world["paths"]["plain"]) == 0
    with pytest.raises(AdapterLoadError, match="already loaded"):
        fused.load_adapter("a", world["paths"]["plain"])
    with pytest.raises(AdapterLoadError, match="slots are in use"):
        fused.load_adapter("b", world["paths"]["rslora"])
    fused.unload_adapter("a")
    assert fused.load_adapter("b", world["paths"]["rslora"]) == 0
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        fused.load_adapter("c", world["root"])
    attn_only = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=1, max_rank=8, target_modules=ATTN)
    with pytest.raises(AdapterLoadError, match="mlp.*_proj.*not a fused layer"):
        attn_only.load_adapter("mlp", world["paths"]["plain"])
    assert attn_only.load_adapter("qv", world["paths"]["qv_only"]) == 0


# ---- generate -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_multi(world):
    """One PeftModel holding several adapters, for per-row set_adapter + generate."""
    names = ["plain", "rank_alpha_pattern", "pissa"]
    model = PeftModel.from_pretrained(copy.deepcopy(world["base"]), world["paths"][names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(world["paths"][n], adapter_name=n)
    return model.eval()


def peft_greedy(peft_model, tok, prompt, adapter, max_new_tokens):
    enc = tok([prompt], return_tensors="pt")
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(**enc, **kw)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(**enc, **kw)
    return out[0, enc["input_ids"].shape[1]:].tolist()


ROUTE_NAMES = ["plain", None, "pissa", "rank_alpha_pattern"]


def test_generate_mixed_batch_equals_peft_per_row(world, peft_multi):
    routes = [[(n, 1.0)] if n else [] for n in ROUTE_NAMES]
    got = generate(world["fused"], world["tok"], PROMPTS, routes, max_new_tokens=12)
    outs = set()
    for b, n in enumerate(ROUTE_NAMES):
        want = peft_greedy(peft_multi, world["tok"], PROMPTS[b], n, 12)
        assert got[b].token_ids == want, f"row {b} ({n})"
        assert got[b].new_tokens == len(want)
        assert got[b].finish_reason == ("eos" if want[-1] == world["tok"].eos_token_id else "length")
        outs.add(tuple(want))
    assert len(outs) > 1  # the adapters do change the generations


def test_generate_per_row_budgets_and_stops(world):
    tok, fused = world["tok"], world["fused"]
    routes = [[("plain", 1.0)], [], [("pissa", 0.5), ("qv_only", 0.5)], [("rslora", 1.0)]]
    free = generate(fused, tok, PROMPTS, routes, max_new_tokens=16, ignore_eos=True)
    assert all(g.new_tokens == 16 and g.finish_reason == "length" for g in free)
    # row 0: stop string taken from its own free-running text; row 1: a budget; others unchanged
    stop0 = free[0].text[5:7]
    budgets = [16, 4, 16, 9]
    got = generate(fused, tok, PROMPTS, routes, max_new_tokens=budgets,
                   stop=[[stop0, "never-appears"], [], ["never-appears"], []], ignore_eos=True)
    cut = free[0].text.find(stop0)
    assert got[0].finish_reason == "stop" and got[0].text == free[0].text[:cut]
    assert got[0].new_tokens < 16 and stop0 in tok.decode(got[0].token_ids)
    assert got[0].token_ids == free[0].token_ids[:got[0].new_tokens]
    assert got[1].finish_reason == "length" and got[1].token_ids == free[1].token_ids[:4]
    assert got[1].text == tok.decode(free[1].token_ids[:4], skip_special_tokens=True)
    assert got[2].token_ids == free[2].token_ids and got[2].text == free[2].text
    assert got[3].token_ids == free[3].token_ids[:9] and got[3].new_tokens == 9


def test_generate_sampling_seeded(world):
    args = (world["fused"], world["tok"], PROMPTS[:2], [[("plain", 1.0)], []])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9, ignore_eos=True)
    a, b = generate(*args, seed=3, **kw), generate(*args, seed=3, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    with pytest.raises(ValueError, match="routes"):
        generate(world["fused"], world["tok"], PROMPTS, [[]], max_new_tokens=2)


# ---- AdapterStore ---------------------------------------------------------------------------------

def test_store_lru_capacity_and_swap(world, tmp_path):
    p = world["paths"]
    fused = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=2, max_rank=8)
    store = AdapterStore(fused, {"a": p["plain"], "b": p["rslora"], "c": p["qv_only"]})
    store.ensure(["a"])
    store.ensure(["b"])
    store.ensure(["a"])  # touch a: b is now least recently used
    assert store.resident == ["b", "a"]
    store.ensure(["c"])
    assert store.resident == ["a", "c"] and set(fused.slots) == {"a", "c"}
    store.ensure(["c", "b"])  # a is the only resident not needed
    assert store.resident == ["c", "b"]
    with pytest.raises(CapacityError, match="3 distinct adapters"):
        store.ensure(["a", "b", "c"])
    assert store.resident == ["c", "b"]  # unchanged
    with pytest.raises(KeyError, match="not in the catalog"):
        store.ensure(["zzz"])
    # c (all targets? no: q/v only) sits in a slot that "a" (all targets) used before: stale rows must be gone
    ids = tokens(2, 6, len(world["tok"]), seed=5)
    with torch.no_grad(), fused.routing([[("c", 1.0)], [("b", 1.0)]]):
        got = fused(input_ids=ids).logits
        assert (got[0] - world["peft"]["qv_only"](input_ids=ids[:1]).logits[0]).abs().max() <= TOL
        assert (got[1] - world["peft"]["rslora"](input_ids=ids[1:]).logits[0]).abs().max() <= TOL
    # swap: b dropped, c re-pointed (new version of the adapter), d new
    shutil.copytree(p["pissa"], tmp_path / "c-v2")
    store.swap_catalog({"a": p["plain"], "c": tmp_path / "c-v2", "d": p["layer1_only"]})
    assert store.resident == [] and fused.slots == {}
    store.ensure(["c", "d"])
    with torch.no_grad(), fused.routing([[("c", 1.0)]]):
        got = fused(input_ids=ids[:1]).logits[0]
        assert (got - world["peft"]["pissa"](input_ids=ids[:1]).logits[0]).abs().max() <= TOL
    assert store.loads == 6 and store.evictions == 4


def test_qwen2_k1_and_mixed_match_peft(tmp_path):
    """Qwen2 (biased q/k/v projections) through the same loader and layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()
    peft_a = make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    peft_b = make_adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=2, use_rslora=True, target_modules=MLP)
    fused = FusedLoraModel(copy.deepcopy(base), max_loras=2, max_rank=4)
    fused.load_adapter("a", tmp_path / "a")
    fused.load_adapter("b", tmp_path / "b")
    ids = tokens(3, 5, 64, seed=3)
    with torch.no_grad(), fused.routing([[("a", 1.0)], [("b", 1.0)], []]):
        got = fused(input_ids=ids).logits
        for b, ref in enumerate([peft_a, peft_b, base]):
            assert (got[b] - ref(input_ids=ids[b:b + 1]).logits[0]).abs().max().item() <= TOL


def test_routing_lora_imports_no_ray_serve_or_training():
    import subprocess
    import sys

    code = ("import sys, routing.lora; bad = sorted(m for m in sys.modules "
            "if m.split('.')[0] in {'ray', 'serve_app', 'training', 'bench'}); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
