"""Length-extrapolation suites of MM v2 and the transformer baseline.

    # validation loss by position bucket, up to 4x the training length
    python tools/eval_extrapolation.py position-loss --model exports/mm \
        --data data/demo/demo_valid_text_document --length 1024 --output pl.json

    # the same from a Megatron checkpoint (converted in memory), without long-term memory
    python tools/eval_extrapolation.py position-loss --model runs/tiny_mm/checkpoints --no-ltm \
        --data data/demo/demo_valid_text_document

    # loss at several inference m (Table 12's axis) and without LTM (Tables 2, 9, 10)
    python tools/eval_extrapolation.py ltm-sweep --model exports/mm --offsets 16,32,64 \
        --with-no-ltm --data data/demo/demo_valid_text_document

    # multi-query associative recall (Zoology) at and beyond the training length
    python tools/eval_extrapolation.py mqar --model exports/mm --lengths 256,512,1024,2048

Exit status: 0 done, 1 failed (the message names the cause), 2 usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_megatron.eval.extrapolation_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
