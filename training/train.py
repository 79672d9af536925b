"""Train from a config file: `python -m training.train --config run.yaml` (or `--sweep sweep.yaml`).

The same library calls `switchboard train adapter --config` and `switchboard sweep --config` make:
`train_from_config(load_run_config(FILE))` and `run_sweep(load_sweep_config(FILE))`. Progress goes to
stderr (a resumed run says `resumed from step N`); the result is one JSON object, the last line on
stdout. A bad config exits with status 2 and names the file and key.

    python -m training.train --config examples/train-zero2.yaml
    python -m training.train --sweep examples/sweep-smoke.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n", 1)[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a run config (training.run_config.RunConfig), YAML or JSON")
    what.add_argument("--sweep", help="a sweep config (training.run_config.SweepConfig), YAML or JSON")
    a = p.parse_args(argv)

    from training.records import RecordError
    from training.run_config import ConfigError, load_run_config, load_sweep_config

    try:
        if a.config:
            from training.distributed import train_from_config

            result = train_from_config(load_run_config(a.config))
        else:
            from training.sweep import run_sweep

            result = run_sweep(load_sweep_config(a.sweep))
    except (ConfigError, RecordError, FileNotFoundError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
