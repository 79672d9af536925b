"""The continuous-batching engine, driven step by step: exact against `generate` (and so against peft)
whatever joins the batch when, chunked prefill, streaming text, sampling, and the scheduler's limits."""

import copy

import pytest
import torch

from routing.engine import Engine, EngineConfig, NeverFitsError, QueueFullError, SamplingParams, Scheduler, Sequence
from routing.engine.text import TextStream
from routing.lora import AdapterStore, FusedLoraModel, generate
from test_fused_lora import make_adapter, make_base, make_tokenizer

ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=16), "c": dict(r=2, lora_alpha=4),
            "d": dict(r=4, lora_alpha=4, use_rslora=True)}
PROMPTS = ["the quick brown", "Question: what is two plus", "hello", "translate to french: the lazy dog",
           "0123456789 the fox"]
ROUTES = [[("a", 1.0)], [], [("a", 0.5), ("b", 0.3), ("c", 0.2)], [("d", 1.0)], [("b", 1.0)]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("engine-adapters")
    tok = make_tokenizer()
    base = make_base(len(tok))
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        make_adapter(base, root / name, seed=200 + i, **cfg)
    return dict(tok=tok, base=base, paths={n: root / n for n in ADAPTERS})


def make_engine(world, slots=4, **cfg) -> Engine:
    fused = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=slots, max_rank=8)
    store = AdapterStore(fused, world["paths"])
    return Engine(fused, world["tok"], store, EngineConfig(**{"kv_cache_tokens": 1024, "block_size": 4, **cfg}),
                  context=fused.model.config.max_position_embeddings)


def reference(world, prompts, routes, n):
    fused = FusedLoraModel(copy.deepcopy(world["base"]), max_loras=4, max_rank=8)
    for name, path in world["paths"].items():
        fused.load_adapter(name, path)
    return [g.token_ids for g in generate(fused, world["tok"], prompts, routes, max_new_tokens=n)]


def run(engine, arrivals: dict[int, list[int]], world, n=12, **kw):
    """Add request i at step `s` for each s -> [i, ...]; step until done; events by request."""
    events, step = {}, 0
    while step <= max(arrivals) or engine.has_work:
        for i in arrivals.get(step, []):
            ids = world["tok"](PROMPTS[i]).input_ids
            engine.add(str(i), ids, ROUTES[i], n, **kw)
            events[str(i)] = []
        for e in engine.step():
            events[e.request_id].append(e)
        step += 1
    return events


def tokens_of(events):
    return {int(k): list(v[-1].token_ids) for k, v in events.items()}


def test_alone_together_and_staggered_equal_static_generate(world):
    want = reference(world, PROMPTS, ROUTES, 12)
    assert len({tuple(w) for w in want}) > 2   # the routes do change the answers
    alone = {i: tokens_of(run(make_engine(world), {0: [i]}, world))[i] for i in range(len(PROMPTS))}
    together = tokens_of(run(make_engine(world), {0: list(range(len(PROMPTS)))}, world))
    staggered = tokens_of(run(make_engine(world), {0: [1], 2: [0, 3], 5: [2], 7: [4]}, world))
    for i, w in enumerate(want):
        assert alone[i] == w and together[i] == w and staggered[i] == w, f"request {i} ({ROUTES[i]})"


def test_chunked_prefill_and_tiny_blocks_change_nothing(world):
    want = reference(world, PROMPTS, ROUTES, 10)
    got = tokens_of(run(make_engine(world, prefill_chunk_tokens=3, block_size=1), {0: [0, 1, 2], 1: [3, 4]}, world,
                        n=10))
    assert [got[i] for i in range(len(PROMPTS))] == want


def test_chunked_prefill_keeps_running_rows_decoding(world):
    engine = make_engine(world, prefill_chunk_tokens=2)
    tok = world["tok"]
    engine.add("short", tok(PROMPTS[0]).input_ids, [("a", 1.0)], 20)
    while not any(e.request_id == "short" for e in engine.step()):
        pass
    engine.add("long", tok(PROMPTS[3] * 2).input_ids, [("b", 1.0)], 4)
    produced = [e for e in engine.step() + engine.step()]
    assert [e.request_id for e in produced] == ["short", "short"]   # the long prompt is still prefilling
    assert not produced[-1].done


def test_stream_deltas_whole_text_and_stops(world):
    free = run(make_engine(world), {0: [0, 3]}, world, n=16)
    text = {k: "".join(e.text for e in v) for k, v in free.items()}
    stop = text["0"][4:7]
    assert len(stop) == 3
    cut = run(make_engine(world), {0: [0, 3]}, world, n=16, stop=(stop, "never"))
    got = "".join(e.text for e in cut["0"])
    assert cut["0"][-1].finish_reason == "stop" and got == text["0"][:text["0"].find(stop)]
    assert stop not in got and all(stop not in e.text for e in cut["0"])
    assert [e.token_ids for e in cut["3"][-1:]] == [free["3"][-1].token_ids]


def test_text_stream_holds_back_partial_stops_and_characters():
    class Chars:   # a tokenizer whose tokens are characters, some of them halves of "é"
        def decode(self, ids, skip_special_tokens=True):
            return "".join({1: "a", 2: "b", 3: "#", 4: "\ufffd"}.get(i, "é") for i in ids)
    s = TextStream(Chars(), ("##",))
    assert s.push([1]) == ("a", False)
    assert s.push([1, 3]) == ("", False)          # "#" may start "##"
    assert s.push([1, 3, 2]) == ("#b", False)
    assert s.push([1, 3, 2, 4]) == ("", False)    # half a character
    assert s.push([1, 3, 2, 5]) == ("é", False)
    assert s.push([1, 3, 2, 5, 3, 3]) == ("", True)


def test_seeded_sampling_does_not_depend_on_batch_mates(world):
    params = SamplingParams(temperature=1.3, top_p=0.9, seed=5)
    alone = run(make_engine(world), {0: [0]}, world, sampling=params)
    mixed = run(make_engine(world), {0: [1, 0], 3: [2, 4]}, world, sampling=params)
    assert alone["0"][-1].token_ids == mixed["0"][-1].token_ids
    greedy = tokens_of(run(make_engine(world), {0: [0]}, world))[0]
    assert list(alone["0"][-1].token_ids) != greedy


def test_abort_frees_the_slot_at_the_next_step(world):
    engine = make_engine(world, max_num_seqs=1)
    tok = world["tok"]
    engine.add("x", tok(PROMPTS[0]).input_ids, [("a", 1.0)], 50)
    engine.add("y", tok(PROMPTS[1]).input_ids, [], 2)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["x"]
    engine.abort("x")
    ends = [e for e in engine.step() if e.done]
    assert [(e.request_id, e.finish_reason) for e in ends] == [("x", "abort")]
    assert [s.request_id for s in engine.scheduler.running] == ["y"]
    while engine.has_work:
        engine.step()
    assert engine.scheduler.blocks.free == engine.scheduler.blocks.num_blocks


def test_refusals_before_anything_changes(world):
    engine = make_engine(world, kv_cache_tokens=64, max_waiting=1)
    tok = world["tok"]
    with pytest.raises(NeverFitsError, match="context"):
        engine.add("long", [5] * 200, [], 4)
    with pytest.raises(NeverFitsError, match="KV tokens"):
        engine.add("big", [5] * 10, [], 100)
    with pytest.raises(KeyError, match="zzz"):
        engine.add("unknown", [5] * 10, [("zzz", 1.0)], 4)
    engine.add("ok", tok(PROMPTS[0]).input_ids, [], 4)
    with pytest.raises(QueueFullError):
        engine.add("full", tok(PROMPTS[0]).input_ids, [], 4)
    assert [s.request_id for s in engine.scheduler.waiting] == ["ok"]


def test_budget_is_cut_to_the_context(world):
    engine = make_engine(world)
    engine.add("edge", [5] * 125, [], 50)
    events = []
    while engine.has_work:
        events += engine.step()
    assert events[-1].finish_reason in ("length", "eos") and events[-1].new_tokens <= 3


def test_pinned_adapter_slots_make_requests_wait_not_fail(world):
    engine = make_engine(world, slots=3)
    events = run(engine, {0: [0, 2, 3, 4]}, world, n=6)   # a+b+c, then d: more than 3 slots at once
    assert engine.store.evictions >= 1
    assert all(v[-1].finish_reason in ("length", "eos") and v[-1].error is None for v in events.values())
    want = reference(world, PROMPTS, ROUTES, 6)
    assert all(tokens_of(events)[i] == want[i] for i in (0, 2, 3, 4))


# ---- the scheduler alone ----------------------------------------------------------------------------

def seq(rid, n_prompt=4, budget=4, adapters=()):
    return Sequence(rid, [7] * n_prompt, tuple((a, 1.0) for a in adapters), budget)


def test_static_admission_waits_for_the_batch_to_drain():
    s = Scheduler(EngineConfig(admission="static", kv_cache_tokens=256, block_size=4), adapter_slots=4)
    s.add(seq("a"))
    plan = s.schedule()
    assert [c.seq.request_id for c in plan.prefills] == ["a"]
    s.advance(plan.prefills[0])
    s.append(plan.prefills[0].seq, 9, frozenset())
    s.add(seq("b"))
    assert [x.request_id for x in s.schedule().decodes] == ["a"] and not s.schedule().prefills
    s.finish(s.running[0], "length")
    assert [c.seq.request_id for c in s.schedule().prefills] == ["b"]


def test_scheduler_limits_seats_memory_and_prefill_budget():
    s = Scheduler(EngineConfig(max_num_seqs=2, kv_cache_tokens=32, block_size=4, prefill_chunk_tokens=6),
                  adapter_slots=1)
    for rid, ad in (("a", ["x"]), ("b", ["y"]), ("c", ["x"]), ("d", [])):
        s.add(seq(rid, n_prompt=5, budget=4, adapters=ad))
    plan = s.schedule()
    # b's adapter does not fit next to a's (1 slot): c is admitted past it, then seats are full
    assert [x.request_id for x in s.running] == ["a", "c"]
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefills] == [("a", 0, 5), ("c", 0, 1)]
    assert s.blocks.free == 8 - 2 * 2


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_llama_family_decoders_match_static_generate(tmp_path, family):
    """Qwen2 (biased q/k/v) and Qwen3 (q/k norms) through the engine's own decoder loop."""
    import transformers

    config_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[family]
    tok = make_tokenizer()
    torch.manual_seed(1)
    config = getattr(transformers, config_cls)(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, max_position_embeddings=64, eos_token_id=2, pad_token_id=0)
    base = getattr(transformers, model_cls)(config).eval()
    make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    routes = [[("a", 1.0)], []]
    fused = FusedLoraModel(copy.deepcopy(base), max_loras=1, max_rank=4)
    fused.load_adapter("a", tmp_path / "a")
    want = [g.token_ids for g in generate(fused, tok, PROMPTS[:2], routes, max_new_tokens=8)]
    fused2 = FusedLoraModel(copy.deepcopy(base), max_loras=1, max_rank=4)
    engine = Engine(fused2, tok, AdapterStore(fused2, {"a": tmp_path / "a"}), EngineConfig(kv_cache_tokens=256, block_size=4),
                    context=64)
    for i in range(2):
        engine.add(str(i), tok(PROMPTS[i]).input_ids, routes[i], 8)
    done = {}
    while engine.has_work:
        done |= {e.request_id: list(e.token_ids) for e in engine.step() if e.done}
    assert [done["0"], done["1"]] == want
