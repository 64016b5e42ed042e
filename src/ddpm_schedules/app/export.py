"""Keep only the flags and the (EMA) weights of a train.py checkpoint: what evaluate.py and load_checkpoint need.

    python -m ddpm_schedules.app.export outputs/<run>/checkpoints/last.ckpt checkpoints/digits.ckpt [--trust-checkpoint]

The source is read as data (torch.load with weights_only=True); a file that needs full unpickling,
which can run code hidden in it, is refused unless --trust-checkpoint is given. The output holds
only tensors and plain values, so it always loads as data.
"""

from __future__ import annotations

import argparse
import sys

from ddpm_schedules.models.checkpoints import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_schedules.app.export", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a .ckpt written by train.py")
    parser.add_argument("dst", help="where to write the exported .ckpt")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle SRC fully even if it holds more than tensors and plain values (can run code hidden in the file)",
    )
    args = parser.parse_args(argv)
    try:
        dst = export_checkpoint(
            args.src, args.dst, trust_checkpoint=args.trust_checkpoint, trust_hint="--trust-checkpoint"
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
