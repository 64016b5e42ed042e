"""Keep only the flags and the (EMA) weights of a train.py checkpoint: what evaluate.py and load_checkpoint need.

    python -m ddpm_schedules.export outputs/<run>/checkpoints/last.ckpt checkpoints/digits.ckpt
"""

import sys

from .checkpoints import export_checkpoint

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m ddpm_schedules.export SRC.ckpt DST.ckpt")
    print(f"wrote {export_checkpoint(sys.argv[1], sys.argv[2])}")
