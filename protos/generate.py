"""Regenerate the Python gRPC stubs next to the .proto files.

    python -m protos.generate            # rewrite the stubs in place
    python -m protos.generate --out DIR  # write them under DIR (the drift test compares the two)

Stubs are generated from the repository root with `-I .`, so they import each other as
`protos.switchboard.v1.*`, the same package path they are installed under.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").rglob("*.proto"))


def generate(out: Path = ROOT) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    generate(parser.parse_args().out)
    print(f"generated stubs for {PROTOS}", file=sys.stderr)
