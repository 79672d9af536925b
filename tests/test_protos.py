
from protos.generate import PROTOS, ROOT, generate


def test_generated_stubs_match_the_proto(tmp_path):
    """Fails when someone edits the .proto without regenerating (python -m protos.generate)."""
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} drifted from {PROTOS}"
