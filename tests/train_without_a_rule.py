"""examples/llama3_128k/train.py run with the rule of ``torch.nn.functional.silu`` removed: the
trainer then meets a model with an op dimshard cannot plan, as with an unsupported family."""

import runpy
import sys
from pathlib import Path

from dimshard.planner import set_rule

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "llama3_128k" / "train.py"

if __name__ == "__main__":
    set_rule("torch.nn.functional.silu", None)
    sys.argv[0] = str(TRAIN)
    runpy.run_path(str(TRAIN), run_name="__main__")
