"""Moved to hardware/offline_gpu.py: `python -m tools.offline_gpu ...` and `python tools/offline_gpu.py ...` still run it."""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script, the repository root is not on the path
    from hardware.offline_gpu import main
    sys.exit(main(sys.argv[1:]))
